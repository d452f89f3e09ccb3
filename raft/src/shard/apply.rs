//! `apply`: one [`ShardCommand`] against the shard state, deterministically.
//!
//! The command runs against a write buffer ([`Overlay`]); its writes (and the advanced shard
//! clock) reach the store only if it is accepted, so a rejection changes nothing.

use super::command::*;
use super::keys;
use super::read::{ShardConfig, MAX_DEAD_LETTERS, MAX_DEAD_LETTER_BYTES, POSTPONE_TIMER_ID, SLEEP_TYPE_NAME};
use super::txn;
use crate::ids::{Epoch, FlowId, NodeId, ShardId};
use crate::kv::Overlay;
use crate::kv::{Kv, KvError};
use crate::placement;

/// Applies `cmd` at batch time `now_ms` (made monotonic by the stored shard clock) and returns the
/// reply and the actions for the leader.
///
/// A rejection (`Ok((Err(_), _))`) changes nothing, not even the clock, and carries no actions.
/// `Err(_)` is a storage failure (or a corrupt row); the caller must abandon the batch.
pub fn apply(kv: &mut dyn Kv, now_ms: u64, cmd: &ShardCommand) -> Result<(ShardReply, Vec<Action>), KvError> {
    apply_at(kv, now_ms, None, cmd)
}

/// [`apply`] for an entry appended by the leader `proposer` (the node of the entry's log id, so
/// every replica knows the same one). A flow it creates gets its first activation at once —
/// epoch 1, claimed by `proposer` ([`Action::Started`]) — instead of a later `Activate` commit
/// of its own. Without a proposer a new flow waits at epoch 0 for its `Activate`.
pub fn apply_at(
    kv: &mut dyn Kv,
    now_ms: u64,
    proposer: Option<NodeId>,
    cmd: &ShardCommand,
) -> Result<(ShardReply, Vec<Action>), KvError> {
    if let ShardCommand::AdminRequest { request_id, flow, expected_epoch, op } = cmd {
        return apply_request(kv, now_ms, proposer, cmd, request_id, |cx| {
            cx.admin(flow, *expected_epoch, op).map(|epoch| ShardOutcome::Mutated { epoch })
        });
    }
    isolated(kv, now_ms, proposer, |cx| cx.run(cmd))
}

/// Runs `body` against a write buffer and commits its writes (and the advanced clock) only if it
/// is accepted.
fn isolated(
    kv: &mut dyn Kv,
    now_ms: u64,
    proposer: Option<NodeId>,
    body: impl FnOnce(&mut Cx<'_>) -> Res<ShardOutcome>,
) -> Result<(ShardReply, Vec<Action>), KvError> {
    let stored_clock: u64 = txn::get(&*kv, keys::CLOCK)?.unwrap_or(0);
    let clock = stored_clock.max(now_ms);
    let (result, actions, writes) = {
        let mut overlay = Overlay::new(&*kv);
        let mut cx = Cx { kv: &mut overlay, clock, actions: Vec::new(), proposer };
        let result = body(&mut cx);
        let actions = std::mem::take(&mut cx.actions);
        (result, actions, overlay.into_writes())
    };
    match result {
        Ok(outcome) => {
            crate::kv::commit(kv, writes);
            if clock != stored_clock {
                txn::put(kv, keys::CLOCK.to_vec(), &clock)?;
            }
            Ok((Ok(outcome), actions))
        }
        Err(Fail::Reject(rejection)) => Ok((Err(rejection), Vec::new())),
        Err(Fail::Kv(e)) => Err(e),
    }
}

/// A stored request id: a fingerprint of the command it came with, when it was applied (shard
/// clock) and the reply it got.
#[derive(serde::Serialize, serde::Deserialize)]
struct RequestRecord {
    fingerprint: u64,
    at_ms: u64,
    reply: ShardReply,
}

/// Applies a command under a request id: the first time, `body` runs and its reply (accepted or
/// rejected) is stored with the id in the same write set; later, the stored reply is returned
/// and nothing changes. A rejection therefore writes one row, the request id, so that a retry
/// answers the same rejection even if the flow changed in between.
fn apply_request(
    kv: &mut dyn Kv,
    now_ms: u64,
    proposer: Option<NodeId>,
    cmd: &ShardCommand,
    request_id: &str,
    body: impl FnOnce(&mut Cx<'_>) -> Res<ShardOutcome>,
) -> Result<(ShardReply, Vec<Action>), KvError> {
    if request_id.is_empty() || request_id.len() > MAX_REQUEST_ID_BYTES {
        let why = format!("a request id must be 1 to {MAX_REQUEST_ID_BYTES} bytes");
        return Ok((Err(Rejection::Invalid(why)), Vec::new()));
    }
    // The whole command, so that an id reused for another request (another flow, operation,
    // payload or expected epoch) is told apart from a retry.
    let fingerprint = match crate::codec::encode(cmd) {
        Ok(bytes) => xxhash_rust::xxh3::xxh3_64(&bytes),
        Err(e) => {
            return Ok((Err(Rejection::Invalid(format!("cannot encode the command: {e}"))), Vec::new()))
        }
    };
    if let Some(stored) = txn::get::<RequestRecord>(&*kv, &keys::request(request_id))? {
        let reply = if stored.fingerprint == fingerprint {
            stored.reply
        } else {
            Err(Rejection::RequestIdReused { request_id: request_id.to_string() })
        };
        return Ok((reply, Vec::new()));
    }
    let (reply, actions) = isolated(kv, now_ms, proposer, body)?;
    let at_ms = txn::get::<u64>(&*kv, keys::CLOCK)?.unwrap_or(0).max(now_ms);
    remember_request(kv, request_id, &RequestRecord { fingerprint, at_ms, reply: reply.clone() })?;
    Ok((reply, actions))
}

/// Stores a request id, making room by forgetting the oldest ones at the bound.
fn remember_request(kv: &mut dyn Kv, request_id: &str, record: &RequestRecord) -> Result<(), KvError> {
    let mut count: u64 = txn::get(&*kv, keys::REQUEST_COUNT)?.unwrap_or(0);
    while count >= MAX_REQUEST_IDS {
        let Some((oldest, _)) = kv.scan(keys::REQUESTS_BY_AGE, None, 1)?.into_iter().next() else { break };
        forget_request(kv, &oldest)?;
        count -= 1;
    }
    txn::put(kv, keys::request(request_id), record)?;
    txn::put(kv, keys::request_by_age(record.at_ms, request_id), &())?;
    txn::put(kv, keys::REQUEST_COUNT.to_vec(), &(count + 1))
}

/// Forgets the request id of one age-index row (and lowers the count).
fn forget_request(kv: &mut dyn Kv, age_key: &[u8]) -> Result<(), KvError> {
    let (_, request_id) =
        keys::parse_request_by_age(age_key).ok_or_else(|| txn::corrupt(age_key, "bad request-age key"))?;
    kv.delete(&keys::request(&request_id));
    kv.delete(age_key);
    let count: u64 = txn::get(&*kv, keys::REQUEST_COUNT)?.unwrap_or(0);
    txn::put(kv, keys::REQUEST_COUNT.to_vec(), &count.saturating_sub(1))
}

/// Why a command did not go through: a rejection (a reply) or a storage failure.
enum Fail {
    Reject(Rejection),
    Kv(KvError),
}

impl From<Rejection> for Fail {
    fn from(r: Rejection) -> Self {
        Fail::Reject(r)
    }
}

impl From<KvError> for Fail {
    fn from(e: KvError) -> Self {
        Fail::Kv(e)
    }
}

type Res<T> = Result<T, Fail>;

fn invalid(msg: impl Into<String>) -> Fail {
    Fail::Reject(Rejection::Invalid(msg.into()))
}

fn bump(epoch: Epoch) -> Res<Epoch> {
    epoch.0.checked_add(1).map(Epoch).ok_or_else(|| invalid("epoch overflow"))
}

/// The result a finished flow reports to its parent.
fn result_of(rec: &FlowRecord) -> Result<Payload, ErrorInfo> {
    match (&rec.status, &rec.output, &rec.error) {
        (FlowStatus::Succeeded, Some(output), _) => Ok(output.clone()),
        (FlowStatus::Succeeded, None, _) => Ok(b"null".to_vec()),
        (_, _, Some(error)) => Err(error.clone()),
        (status, _, None) => {
            Err(ErrorInfo { kind: "failed".into(), message: format!("flow ended {status:?}") })
        }
    }
}

fn json_of<T: serde::Serialize>(value: &T) -> Res<Payload> {
    serde_json::to_vec(value).map_err(|e| invalid(format!("cannot encode value: {e}")))
}

/// One command's execution context.
struct Cx<'a> {
    kv: &'a mut dyn Kv,
    clock: u64,
    actions: Vec<Action>,
    /// The leader that appended the entry, when known ([`apply_at`]).
    proposer: Option<NodeId>,
}

impl Cx<'_> {
    fn run(&mut self, cmd: &ShardCommand) -> Res<ShardOutcome> {
        match cmd {
            ShardCommand::Configure { shard_id, shard_count } => self.configure(*shard_id, *shard_count),
            ShardCommand::Start { flow, input, parent } => self.start(flow, input, parent.as_ref()),
            ShardCommand::Activate { flow, epoch } => self.activate(flow, *epoch),
            ShardCommand::EffectStarted { flow, epoch, effect_id, kind, type_name } => {
                self.effect_started(flow, *epoch, effect_id, *kind, type_name)
            }
            ShardCommand::EffectCompleted { flow, epoch, effect_id, kind, type_name, value } => self
                .effect_outcome(
                    flow,
                    *epoch,
                    effect_id,
                    *kind,
                    type_name,
                    EffectState::Completed(value.clone()),
                ),
            ShardCommand::EffectFailed { flow, epoch, effect_id, kind, type_name, error } => self
                .effect_outcome(
                    flow,
                    *epoch,
                    effect_id,
                    *kind,
                    type_name,
                    EffectState::Failed(error.clone()),
                ),
            ShardCommand::EffectAttemptFailed { flow, epoch, effect_id, attempt, error, retry_at_ms } => {
                self.effect_attempt_failed(flow, *epoch, effect_id, *attempt, error, *retry_at_ms)
            }
            ShardCommand::StateSet { flow, epoch, state_id, type_name, value } => {
                self.state_set(flow, *epoch, state_id, type_name, value)
            }
            ShardCommand::StateClear { flow, epoch, state_id } => self.state_clear(flow, *epoch, state_id),
            ShardCommand::AppendEvent { flow, event } => {
                let mut rec = self.load(flow)?.ok_or(Rejection::FlowNotFound)?;
                // A retry of a message already appended is acknowledged even if the flow has
                // finished since (the first attempt's reply may have been lost).
                if let Event::Message { idempotency_key: Some(key), .. } = event {
                    if let Some(seq) = txn::get::<u64>(&*self.kv, &keys::idem(&rec.id, key))? {
                        return Ok(ShardOutcome::Duplicate { seq });
                    }
                }
                if rec.status.is_finished() {
                    return Err(Rejection::FlowFinished.into());
                }
                self.append_event(&mut rec, event.clone())
            }
            ShardCommand::Suspend { flow, epoch, events_seen } => self.suspend(flow, *epoch, *events_seen),
            ShardCommand::Postpone { flow, epoch, until_ms } => self.postpone(flow, *epoch, *until_ms),
            ShardCommand::ArmTimer { flow, epoch, timer_id, deadline_ms } => {
                self.arm_timer(flow, *epoch, timer_id, *deadline_ms)
            }
            ShardCommand::FireTimer { flow, timer_id } => self.fire_timer(flow, timer_id),
            ShardCommand::Complete { flow, epoch, output } => {
                let mut rec = self.activation(flow, *epoch)?;
                self.finish(&mut rec, FlowStatus::Succeeded, Ok(output.clone()))?;
                Ok(ShardOutcome::Done)
            }
            ShardCommand::Fail { flow, epoch, error } => {
                let mut rec = self.activation(flow, *epoch)?;
                self.finish(&mut rec, FlowStatus::Failed, Err(error.clone()))?;
                Ok(ShardOutcome::Done)
            }
            ShardCommand::Send { flow, epoch, effect_id, target, type_name, payload } => {
                self.send(flow, *epoch, effect_id, target, type_name, payload)
            }
            ShardCommand::StartChild { flow, epoch, effect_id, child, input } => {
                self.start_child(flow, *epoch, effect_id, child, input)
            }
            ShardCommand::OutboxDeliver { source, first_seq, entries } => {
                self.deliver(*source, *first_seq, entries)
            }
            ShardCommand::OutboxAck { target, upto_seq } => self.ack(*target, *upto_seq),
            ShardCommand::Admin { flow, expected_epoch, op } => {
                self.admin(flow, *expected_epoch, op).map(|_| ShardOutcome::Done)
            }
            // Handled by `apply` before a context exists (its reply is stored even when rejected).
            ShardCommand::AdminRequest { .. } => Err(invalid("a request cannot be nested")),
            ShardCommand::Gc { cutoff_ms, max_flows } => self.gc(*cutoff_ms, *max_flows),
            ShardCommand::Note { flow, epoch, note } => {
                self.activation(flow, *epoch)?;
                if note.len() > MAX_NOTE_BYTES {
                    return Err(invalid(format!(
                        "a note is at most {MAX_NOTE_BYTES} bytes, not {}",
                        note.len()
                    )));
                }
                txn::put(self.kv, keys::note(flow), note)?;
                Ok(ShardOutcome::Done)
            }
        }
    }

    // --- rows ---

    fn load(&self, flow: &FlowId) -> Res<Option<FlowRecord>> {
        Ok(txn::get(&*self.kv, &keys::flow(flow))?)
    }

    /// Stores `rec` (stamping `updated_ms`) and keeps the running index in step with its status.
    fn save(&mut self, rec: &mut FlowRecord, was_running: bool) -> Res<()> {
        rec.updated_ms = self.clock;
        txn::put(self.kv, keys::flow(&rec.id), rec)?;
        let running = rec.status == FlowStatus::Running;
        if running && !was_running {
            txn::put(self.kv, keys::running(&rec.id), &())?;
        } else if !running && was_running {
            self.kv.delete(&keys::running(&rec.id));
        }
        Ok(())
    }

    fn effect(&self, flow: &FlowId, effect_id: &str) -> Res<Option<EffectRecord>> {
        Ok(txn::get(&*self.kv, &keys::effect(flow, effect_id))?)
    }

    fn put_effect(&mut self, flow: &FlowId, effect_id: &str, record: &EffectRecord) -> Res<()> {
        Ok(txn::put(self.kv, keys::effect(flow, effect_id), record)?)
    }

    fn config(&self) -> Res<Option<ShardConfig>> {
        Ok(txn::get(&*self.kv, keys::CONFIG)?)
    }

    fn act(&mut self, action: Action) {
        if !self.actions.contains(&action) {
            self.actions.push(action);
        }
    }

    /// The flow of an activation command: it exists, `epoch` is current and it is running.
    fn activation(&self, flow: &FlowId, epoch: Epoch) -> Res<FlowRecord> {
        let rec = self.load(flow)?.ok_or(Rejection::FlowNotFound)?;
        if rec.epoch != epoch && !crate::bugs::planted("epoch-check") {
            return Err(Rejection::StaleEpoch { got: epoch, current: rec.epoch }.into());
        }
        if rec.status.is_finished() {
            return Err(Rejection::FlowFinished.into());
        }
        if rec.status != FlowStatus::Running {
            return Err(Rejection::NotRunning.into());
        }
        Ok(rec)
    }

    // --- timers ---

    fn put_timer(&mut self, flow: &FlowId, timer_id: &str, deadline_ms: u64) -> Res<()> {
        txn::put(self.kv, keys::flow_timer(flow, timer_id), &deadline_ms)?;
        txn::put(self.kv, keys::timer_index(deadline_ms, flow, timer_id), &())?;
        Ok(())
    }

    fn timer(&self, flow: &FlowId, timer_id: &str) -> Res<Option<u64>> {
        Ok(txn::get(&*self.kv, &keys::flow_timer(flow, timer_id))?)
    }

    /// Removes one timer from the per-flow rows and the index; returns its deadline if armed.
    fn remove_timer(&mut self, flow: &FlowId, timer_id: &str) -> Res<Option<u64>> {
        let deadline = self.timer(flow, timer_id)?;
        if let Some(deadline) = deadline {
            self.kv.delete(&keys::flow_timer(flow, timer_id));
            self.kv.delete(&keys::timer_index(deadline, flow, timer_id));
        }
        Ok(deadline)
    }

    fn remove_all_timers(&mut self, flow: &FlowId) -> Res<()> {
        let prefix = keys::flow_timers_prefix(flow);
        for (key, value) in txn::scan_all(&*self.kv, &prefix)? {
            let timer_id = key
                .strip_prefix(prefix.as_slice())
                .and_then(keys::utf8)
                .ok_or_else(|| txn::corrupt(&key, "bad timer key"))?;
            let deadline: u64 = txn::decode(&key, &value)?;
            self.kv.delete(&keys::timer_index(deadline, flow, &timer_id));
            self.kv.delete(&key);
        }
        Ok(())
    }

    fn delete_prefix(&mut self, prefix: &[u8]) -> Res<()> {
        for (key, _) in txn::scan_all(&*self.kv, prefix)? {
            self.kv.delete(&key);
        }
        Ok(())
    }

    // --- outbox ---

    /// Where the next outbox entry for `flow` goes: this shard, the shard that owns `flow`, and
    /// the entry's number in the outbox to that shard.
    fn outbox_slot(&self, flow: &FlowId) -> Res<(ShardId, ShardId, u64)> {
        let config = self.config()?.ok_or_else(|| invalid("shard not configured"))?;
        if config.shard_count == 0 {
            return Err(txn::corrupt(keys::CONFIG, "shard count 0").into());
        }
        let target = placement::shard_of(flow, config.shard_count);
        let last: u64 = txn::get(&*self.kv, &keys::outbox_next(target))?.unwrap_or(0);
        let seq = last.checked_add(1).ok_or_else(|| invalid("outbox numbers exhausted"))?;
        Ok((config.shard_id, target, seq))
    }

    /// Appends `entry` to the outbox of the shard that owns its target flow.
    fn outbox(&mut self, entry: &OutboxEntry) -> Res<()> {
        let (_, target, seq) = self.outbox_slot(entry.target_flow())?;
        txn::put(self.kv, keys::outbox(target, seq), entry)?;
        txn::put(self.kv, keys::outbox_next(target), &seq)?;
        self.act(Action::DeliverOutbox { target });
        Ok(())
    }

    // --- commands ---

    fn configure(&mut self, shard_id: ShardId, shard_count: u32) -> Res<ShardOutcome> {
        if shard_id.0 >= shard_count {
            return Err(invalid(format!("shard {shard_id} is not below the shard count {shard_count}")));
        }
        let wanted = ShardConfig { shard_id, shard_count };
        match self.config()? {
            Some(stored) if stored == wanted => Ok(ShardOutcome::Done),
            Some(stored) => Err(invalid(format!(
                "shard already configured as {} of {}",
                stored.shard_id, stored.shard_count
            ))),
            None => {
                txn::put(self.kv, keys::CONFIG.to_vec(), &wanted)?;
                Ok(ShardOutcome::Done)
            }
        }
    }

    fn start(&mut self, flow: &FlowId, input: &Payload, parent: Option<&FlowId>) -> Res<ShardOutcome> {
        if parent == Some(flow) {
            return Err(invalid("a flow cannot be its own parent"));
        }
        if let Some(rec) = self.load(flow)? {
            return if &rec.input == input {
                Ok(ShardOutcome::AlreadyExists { status: rec.status })
            } else {
                Err(Rejection::InputMismatch.into())
            };
        }
        self.create(flow, input, parent)?;
        Ok(ShardOutcome::Started)
    }

    fn create(&mut self, flow: &FlowId, input: &Payload, parent: Option<&FlowId>) -> Res<()> {
        let mut rec = FlowRecord {
            id: flow.clone(),
            input: input.clone(),
            status: FlowStatus::Running,
            epoch: Epoch(0),
            output: None,
            error: None,
            parent: parent.cloned(),
            events_len: 0,
            created_ms: self.clock,
            updated_ms: self.clock,
            finished_ms: None,
            seed: self.next_seed()?,
        };
        match self.proposer {
            // The start and the first activation in one entry: epoch 1 belongs to the leader
            // that appended it. Any other node that comes to run the flow commits an `Activate`
            // of epoch 2 first, which fences it.
            Some(by) => {
                rec.epoch = Epoch(1);
                self.save(&mut rec, false)?;
                self.act(Action::Started { flow: flow.clone(), epoch: rec.epoch, by });
            }
            None => {
                self.save(&mut rec, false)?;
                self.act(Action::Activate { flow: flow.clone() });
            }
        }
        Ok(())
    }

    /// A run seed no flow of this shard has had ([`FlowRecord::seed`]).
    fn next_seed(&mut self) -> Res<u64> {
        let seed = txn::get::<u64>(&*self.kv, keys::SEEDS)?.unwrap_or(0) + 1;
        txn::put(self.kv, keys::SEEDS.to_vec(), &seed)?;
        Ok(seed)
    }

    fn activate(&mut self, flow: &FlowId, epoch: Epoch) -> Res<ShardOutcome> {
        let mut rec = self.load(flow)?.ok_or(Rejection::FlowNotFound)?;
        let expected = bump(rec.epoch)?;
        if epoch != expected {
            return Err(Rejection::StaleEpoch { got: epoch, current: rec.epoch }.into());
        }
        if rec.status.is_finished() {
            return Err(Rejection::FlowFinished.into());
        }
        let was_running = rec.status == FlowStatus::Running;
        if matches!(rec.status, FlowStatus::Postponed { .. }) {
            self.remove_timer(flow, POSTPONE_TIMER_ID)?;
        }
        rec.status = FlowStatus::Running;
        rec.epoch = epoch;
        // A new activation: whatever held the last one up is no longer known to hold.
        self.kv.delete(&keys::note(flow));
        self.save(&mut rec, was_running)?;
        Ok(ShardOutcome::Activated { epoch })
    }

    fn effect_started(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        effect_id: &str,
        kind: EffectKind,
        type_name: &str,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if let Some(stored) = self.effect(flow, effect_id)? {
            // The at-most-once guard: only a known outcome of the previous attempt (a retried
            // error) lets another attempt start. A `Started` effect may have run its work with an
            // outcome nobody recorded, and a `Completed`/`Failed` one is settled.
            if !matches!(stored.state, EffectState::AttemptFailed { .. }) {
                return Err(Rejection::EffectAlreadyStarted { effect_id: effect_id.into() }.into());
            }
            Self::check_kind(&stored, effect_id, kind)?;
        }
        let record = EffectRecord { kind, type_name: type_name.into(), state: EffectState::Started };
        self.put_effect(flow, effect_id, &record)?;
        Ok(ShardOutcome::Done)
    }

    /// `Started` → `AttemptFailed`: the attempt in flight returned an error that will be retried.
    fn effect_attempt_failed(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        effect_id: &str,
        attempt: u32,
        error: &ErrorInfo,
        retry_at_ms: u64,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if attempt == 0 {
            return Err(invalid("attempts are counted from 1"));
        }
        let mut stored = match self.effect(flow, effect_id)? {
            Some(stored) => stored,
            None => return Err(Rejection::EffectNotStarted { effect_id: effect_id.into() }.into()),
        };
        match stored.state {
            EffectState::Started => {}
            EffectState::Completed(_) | EffectState::Failed(_) => {
                return Err(Rejection::EffectAlreadyRecorded { effect_id: effect_id.into() }.into())
            }
            EffectState::AttemptFailed { .. } => {
                return Err(Rejection::EffectNotStarted { effect_id: effect_id.into() }.into())
            }
        }
        stored.state = EffectState::AttemptFailed { attempt, error: error.clone(), retry_at_ms };
        self.put_effect(flow, effect_id, &stored)?;
        Ok(ShardOutcome::Done)
    }

    /// Rejects a command of `kind` on a stored effect of another kind.
    fn check_kind(stored: &EffectRecord, effect_id: &str, kind: EffectKind) -> Res<()> {
        if stored.kind != kind {
            return Err(Rejection::KindMismatch {
                effect_id: effect_id.into(),
                recorded: stored.kind,
                requested: kind,
            }
            .into());
        }
        Ok(())
    }

    fn effect_outcome(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        effect_id: &str,
        kind: EffectKind,
        type_name: &str,
        state: EffectState,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if let Some(stored) = self.effect(flow, effect_id)? {
            Self::check_kind(&stored, effect_id, kind)?;
            // An outcome settles a started attempt, or a failed one that will not be retried
            // (the code's policy allows no more attempts).
            if matches!(stored.state, EffectState::Completed(_) | EffectState::Failed(_)) {
                return Err(Rejection::EffectAlreadyRecorded { effect_id: effect_id.into() }.into());
            }
        }
        self.put_effect(flow, effect_id, &EffectRecord { kind, type_name: type_name.into(), state })?;
        Ok(ShardOutcome::Done)
    }

    fn state_set(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        state_id: &str,
        type_name: &str,
        value: &Payload,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if let Some(stored) = self.effect(flow, state_id)? {
            Self::check_kind(&stored, state_id, EffectKind::State)?;
        }
        let record = EffectRecord {
            kind: EffectKind::State,
            type_name: type_name.into(),
            state: EffectState::Completed(value.clone()),
        };
        self.put_effect(flow, state_id, &record)?;
        Ok(ShardOutcome::Done)
    }

    fn state_clear(&mut self, flow: &FlowId, epoch: Epoch, state_id: &str) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if let Some(stored) = self.effect(flow, state_id)? {
            Self::check_kind(&stored, state_id, EffectKind::State)?;
            self.kv.delete(&keys::effect(flow, state_id));
        }
        Ok(ShardOutcome::Done)
    }

    /// Appends `event` to the log of `rec` (which exists and is not finished), honoring a
    /// message's idempotency key, and wakes a suspended flow.
    fn append_event(&mut self, rec: &mut FlowRecord, event: Event) -> Res<ShardOutcome> {
        let seq = rec.events_len;
        if let Event::Message { idempotency_key: Some(key), .. } = &event {
            let idem_key = keys::idem(&rec.id, key);
            if let Some(stored) = txn::get::<u64>(&*self.kv, &idem_key)? {
                return Ok(ShardOutcome::Duplicate { seq: stored });
            }
            txn::put(self.kv, idem_key, &seq)?;
        }
        txn::put(self.kv, keys::event(&rec.id, seq), &event)?;
        rec.events_len = seq.checked_add(1).ok_or_else(|| invalid("event log full"))?;
        let was_running = rec.status == FlowStatus::Running;
        match rec.status {
            FlowStatus::Suspended => {
                rec.status = FlowStatus::Running;
                self.act(Action::Activate { flow: rec.id.clone() });
            }
            FlowStatus::Running => {
                self.act(Action::EventAppended { flow: rec.id.clone(), events_len: rec.events_len });
            }
            // A postponed flow is woken by its postpone timer, not by events.
            _ => {}
        }
        self.save(rec, was_running)?;
        Ok(ShardOutcome::Appended { seq })
    }

    fn suspend(&mut self, flow: &FlowId, epoch: Epoch, events_seen: u64) -> Res<ShardOutcome> {
        let mut rec = self.activation(flow, epoch)?;
        if rec.events_len > events_seen {
            return Ok(ShardOutcome::Resume { events_len: rec.events_len });
        }
        if events_seen > rec.events_len {
            return Err(invalid(format!("events_seen {events_seen} beyond the log ({})", rec.events_len)));
        }
        rec.status = FlowStatus::Suspended;
        self.save(&mut rec, true)?;
        Ok(ShardOutcome::Suspended)
    }

    fn postpone(&mut self, flow: &FlowId, epoch: Epoch, until_ms: u64) -> Res<ShardOutcome> {
        let mut rec = self.activation(flow, epoch)?;
        self.remove_timer(flow, POSTPONE_TIMER_ID)?;
        self.put_timer(flow, POSTPONE_TIMER_ID, until_ms)?;
        rec.status = FlowStatus::Postponed { until_ms };
        self.save(&mut rec, true)?;
        self.act(Action::ArmTimer {
            flow: flow.clone(),
            timer_id: POSTPONE_TIMER_ID.into(),
            deadline_ms: until_ms,
        });
        Ok(ShardOutcome::Done)
    }

    fn arm_timer(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        timer_id: &str,
        deadline_ms: u64,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if timer_id == POSTPONE_TIMER_ID {
            return Err(invalid(format!("timer id {POSTPONE_TIMER_ID} is reserved")));
        }
        let conflict = || Fail::Reject(Rejection::TimerConflict { timer_id: timer_id.into() });
        let deadline_json = json_of(&deadline_ms)?;
        let sleep = EffectRecord {
            kind: EffectKind::Sleep,
            type_name: SLEEP_TYPE_NAME.into(),
            state: EffectState::Completed(deadline_json),
        };
        let armed = self.timer(flow, timer_id)?;
        if let Some(armed) = armed {
            if armed != deadline_ms {
                return Err(conflict());
            }
        }
        match self.effect(flow, timer_id)? {
            Some(stored) => {
                Self::check_kind(&stored, timer_id, EffectKind::Sleep)?;
                if stored.state != sleep.state {
                    return Err(conflict());
                }
                // Re-arming an armed timer is a no-op; re-arming a fired one must not arm it again.
                if armed.is_some() {
                    self.act(Action::ArmTimer { flow: flow.clone(), timer_id: timer_id.into(), deadline_ms });
                }
            }
            None => {
                self.put_effect(flow, timer_id, &sleep)?;
                if armed.is_none() {
                    self.put_timer(flow, timer_id, deadline_ms)?;
                }
                self.act(Action::ArmTimer { flow: flow.clone(), timer_id: timer_id.into(), deadline_ms });
            }
        }
        Ok(ShardOutcome::Done)
    }

    fn fire_timer(&mut self, flow: &FlowId, timer_id: &str) -> Res<ShardOutcome> {
        let not_fired = Ok(ShardOutcome::TimerFired { fired: false });
        let Some(mut rec) = self.load(flow)? else { return not_fired };
        let Some(deadline_ms) = self.timer(flow, timer_id)? else { return not_fired };
        if deadline_ms > self.clock {
            return Err(Rejection::TimerNotDue { deadline_ms }.into());
        }
        self.remove_timer(flow, timer_id)?;
        if timer_id == POSTPONE_TIMER_ID {
            if matches!(rec.status, FlowStatus::Postponed { .. }) {
                rec.status = FlowStatus::Running;
                self.save(&mut rec, false)?;
                self.act(Action::Activate { flow: flow.clone() });
            }
        } else if !rec.status.is_finished() {
            self.append_event(&mut rec, Event::TimerFired { timer_id: timer_id.into() })?;
        }
        Ok(ShardOutcome::TimerFired { fired: true })
    }

    /// Finishes `rec` (which is not finished): status, result, timers, retention, the parent's
    /// `ChildResult` through the outbox.
    fn finish(
        &mut self,
        rec: &mut FlowRecord,
        status: FlowStatus,
        result: Result<Payload, ErrorInfo>,
    ) -> Res<()> {
        let was_running = rec.status == FlowStatus::Running;
        match &result {
            Ok(output) => {
                rec.output = Some(output.clone());
                rec.error = None;
            }
            Err(error) => {
                rec.output = None;
                rec.error = Some(error.clone());
            }
        }
        rec.status = status.clone();
        rec.finished_ms = Some(self.clock);
        self.kv.delete(&keys::note(&rec.id));
        self.remove_all_timers(&rec.id)?;
        txn::put(self.kv, keys::retention(self.clock, &rec.id), &())?;
        self.save(rec, was_running)?;
        if let Some(parent) = &rec.parent {
            self.outbox(&OutboxEntry::ChildResult { parent: parent.clone(), child: rec.id.clone(), result })?;
        }
        self.act(Action::Finished { flow: rec.id.clone(), status });
        Ok(())
    }

    /// Cancels `rec` (which is not finished): a new epoch, `Cancelled`, and `CancelChild` for
    /// every child it started.
    fn cancel(&mut self, rec: &mut FlowRecord, message: &str) -> Res<()> {
        rec.epoch = bump(rec.epoch)?;
        self.act(Action::Fence { flow: rec.id.clone() });
        let prefix = keys::children_prefix(&rec.id);
        for (key, _) in txn::scan_all(&*self.kv, &prefix)? {
            let child = key
                .strip_prefix(prefix.as_slice())
                .and_then(keys::take_flow)
                .filter(|(_, rest)| rest.is_empty())
                .map(|(child, _)| child)
                .ok_or_else(|| txn::corrupt(&key, "bad child key"))?;
            self.outbox(&OutboxEntry::CancelChild { child })?;
        }
        let error = ErrorInfo { kind: "cancelled".into(), message: message.into() };
        self.finish(rec, FlowStatus::Cancelled, Err(error))
    }

    /// Removes every row of `rec`.
    fn delete_flow(&mut self, rec: &FlowRecord) -> Res<()> {
        self.remove_all_timers(&rec.id)?;
        self.delete_prefix(&keys::scope(&rec.id))?;
        self.kv.delete(&keys::flow(&rec.id));
        self.kv.delete(&keys::running(&rec.id));
        if let Some(finished) = rec.finished_ms {
            self.kv.delete(&keys::retention(finished, &rec.id));
        }
        Ok(())
    }

    /// Records an outbox-backed effect (`Send` / `Child`) once.
    fn record_once(&mut self, flow: &FlowId, effect_id: &str, record: &EffectRecord) -> Res<()> {
        if let Some(stored) = self.effect(flow, effect_id)? {
            Self::check_kind(&stored, effect_id, record.kind)?;
            return Err(Rejection::EffectAlreadyRecorded { effect_id: effect_id.into() }.into());
        }
        self.put_effect(flow, effect_id, record)
    }

    fn send(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        effect_id: &str,
        target: &FlowId,
        type_name: &str,
        payload: &Payload,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        let record = EffectRecord {
            kind: EffectKind::Send,
            type_name: type_name.into(),
            state: EffectState::Completed(b"null".to_vec()),
        };
        self.record_once(flow, effect_id, &record)?;
        // Exactly once comes from the recorded effect (a replay finds it and sends nothing) and
        // the outbox numbering (a redelivery is skipped at the target). The key only names this
        // send; it holds the entry's outbox position, which is never reused, so a send that runs
        // again after an operator removed or cleared its effect (or deleted and reused the
        // sender's id) is a new message at the target, not a duplicate of the old one.
        let (source, target_shard, seq) = self.outbox_slot(target)?;
        self.outbox(&OutboxEntry::FlowMessage {
            sender: flow.clone(),
            target: target.clone(),
            type_name: type_name.into(),
            payload: payload.clone(),
            idempotency_key: Some(format!("{flow}#{effect_id}@{source}>{target_shard}:{seq}")),
        })?;
        Ok(ShardOutcome::Done)
    }

    fn start_child(
        &mut self,
        flow: &FlowId,
        epoch: Epoch,
        effect_id: &str,
        child: &FlowId,
        input: &Payload,
    ) -> Res<ShardOutcome> {
        self.activation(flow, epoch)?;
        if child == flow {
            return Err(invalid("a flow cannot be its own child"));
        }
        let record = EffectRecord {
            kind: EffectKind::Child,
            type_name: child.flow_type.clone(),
            state: EffectState::Completed(json_of(child)?),
        };
        self.record_once(flow, effect_id, &record)?;
        txn::put(self.kv, keys::child(flow, child), &())?;
        self.outbox(&OutboxEntry::StartChild {
            child: child.clone(),
            input: input.clone(),
            parent: flow.clone(),
        })?;
        Ok(ShardOutcome::Done)
    }

    fn deliver(&mut self, source: ShardId, first_seq: u64, entries: &[OutboxEntry]) -> Res<ShardOutcome> {
        let inbound_key = keys::inbound(source);
        let last: u64 = txn::get(&*self.kv, &inbound_key)?.unwrap_or(0);
        let count = u64::try_from(entries.len()).map_err(|_| invalid("batch too large"))?;
        if count > 0 && first_seq.checked_add(count - 1).is_none() {
            return Err(invalid("outbox numbers overflow"));
        }
        // Entries numbered at or below `last` were applied before.
        let skip = last.saturating_sub(first_seq).saturating_add(1).min(count);
        let skip = if first_seq > last { 0 } else { skip };
        let fresh = entries.get(usize::try_from(skip).unwrap_or(usize::MAX)..).unwrap_or(&[]);
        if !fresh.is_empty() {
            let first_new = first_seq.saturating_add(skip);
            let expected = last.saturating_add(1);
            if first_new != expected {
                return Err(Rejection::OutboxGap { source_shard: source, expected, got: first_new }.into());
            }
            for entry in fresh {
                self.deliver_one(entry)?;
            }
            let highest = first_new.saturating_add(u64::try_from(fresh.len()).unwrap_or(u64::MAX) - 1);
            txn::put(self.kv, inbound_key, &highest)?;
        }
        let applied = u32::try_from(fresh.len()).unwrap_or(u32::MAX);
        let duplicates = u32::try_from(skip).unwrap_or(u32::MAX);
        Ok(ShardOutcome::Delivered { applied, duplicates })
    }

    fn deliver_one(&mut self, entry: &OutboxEntry) -> Res<()> {
        match entry {
            OutboxEntry::StartChild { child, input, parent } => {
                if child == parent {
                    return Ok(());
                }
                match self.load(child)? {
                    None => self.create(child, input, Some(parent))?,
                    Some(existing)
                        if existing.input == *input && existing.parent.as_ref() == Some(parent) =>
                    {
                        // A repeated start by the same parent (its effect was removed or cleared):
                        // a finished child reports its result again.
                        if existing.status.is_finished() {
                            self.outbox(&OutboxEntry::ChildResult {
                                parent: parent.clone(),
                                child: child.clone(),
                                result: result_of(&existing),
                            })?;
                        }
                    }
                    Some(existing) => {
                        // The id is taken by another flow: nothing is recorded at the child, and
                        // the parent hears at once instead of waiting forever.
                        let (kind, message) = if existing.input != *input {
                            ("input_mismatch", format!("child {child} exists with a different input"))
                        } else {
                            ("child_conflict", format!("child {child} exists and belongs to another parent"))
                        };
                        self.outbox(&OutboxEntry::ChildResult {
                            parent: parent.clone(),
                            child: child.clone(),
                            result: Err(ErrorInfo { kind: kind.into(), message }),
                        })?;
                    }
                }
            }
            OutboxEntry::ChildResult { parent, child, result } => {
                if let Some(mut rec) = self.load(parent)?.filter(|r| !r.status.is_finished()) {
                    self.append_event(
                        &mut rec,
                        Event::ChildResult { child: child.clone(), result: result.clone() },
                    )?;
                }
            }
            OutboxEntry::Message { target, type_name, payload, idempotency_key } => {
                self.deliver_message(None, target, type_name, payload, idempotency_key.as_deref())?;
            }
            OutboxEntry::FlowMessage { sender, target, type_name, payload, idempotency_key } => {
                self.deliver_message(Some(sender), target, type_name, payload, idempotency_key.as_deref())?;
            }
            OutboxEntry::CancelChild { child } => {
                if let Some(mut rec) = self.load(child)?.filter(|r| !r.status.is_finished()) {
                    self.cancel(&mut rec, "cancelled with its parent")?;
                }
            }
        }
        Ok(())
    }

    /// Appends a message from another shard's outbox to its target's log, or keeps it as a dead
    /// letter when the target is missing or finished (a message the target already holds under
    /// the same key was delivered before and is not a letter).
    fn deliver_message(
        &mut self,
        sender: Option<&FlowId>,
        target: &FlowId,
        type_name: &str,
        payload: &Payload,
        idempotency_key: Option<&str>,
    ) -> Res<()> {
        let reason = match self.load(target)? {
            Some(mut rec) if !rec.status.is_finished() => {
                let event = Event::Message {
                    type_name: type_name.into(),
                    payload: payload.clone(),
                    idempotency_key: idempotency_key.map(Into::into),
                };
                self.append_event(&mut rec, event)?;
                return Ok(());
            }
            Some(rec) => {
                if let Some(key) = idempotency_key {
                    if txn::get::<u64>(&*self.kv, &keys::idem(target, key))?.is_some() {
                        return Ok(());
                    }
                }
                DeadLetterReason::Finished { status: rec.status }
            }
            None => DeadLetterReason::NotFound,
        };
        let mut stats = self.dead_letter_stats()?;
        let seq = stats.last_seq.checked_add(1).ok_or_else(|| invalid("dead-letter numbers exhausted"))?;
        let letter = DeadLetter {
            seq,
            target: target.clone(),
            sender: sender.cloned(),
            type_name: type_name.into(),
            payload: payload.clone(),
            idempotency_key: idempotency_key.map(Into::into),
            reason,
            at_ms: self.clock,
        };
        let value = crate::codec::encode(&letter).map_err(|e| KvError::Storage(e.to_string()))?;
        let size = u64::try_from(value.len()).unwrap_or(u64::MAX);
        self.kv.put(keys::dead_letter(target, seq), value);
        txn::put(self.kv, keys::dead_letter_queue(seq, target), &self.clock)?;
        stats.last_seq = seq;
        stats.count = stats.count.saturating_add(1);
        stats.bytes = stats.bytes.saturating_add(size);
        // The list is bounded by count and bytes: the oldest letters make room (counted, so the
        // loss is visible). The newest letter always stays.
        // Each scan starts after the row dropped last, so that rows deleted earlier in this
        // command (still buffered) are not walked over again.
        let mut from: Option<Vec<u8>> = None;
        while stats.count > 1 && (stats.count > MAX_DEAD_LETTERS || stats.bytes > MAX_DEAD_LETTER_BYTES) {
            let oldest = self.kv.scan(keys::DEAD_LETTER_QUEUE, from.as_deref(), 1)?;
            let Some((key, _)) = oldest.into_iter().next() else { break };
            self.drop_dead_letter(&key, &mut stats)?;
            stats.evicted = stats.evicted.saturating_add(1);
            from = Some(keys::successor(&key));
        }
        txn::put(self.kv, keys::DEAD_LETTER_STATS.to_vec(), &stats)?;
        Ok(())
    }

    fn dead_letter_stats(&self) -> Res<DeadLetterStats> {
        Ok(txn::get(&*self.kv, keys::DEAD_LETTER_STATS)?.unwrap_or_default())
    }

    /// Removes the dead letter whose arrival-order key is `queue_key` (both of its rows).
    fn drop_dead_letter(&mut self, queue_key: &[u8], stats: &mut DeadLetterStats) -> Res<()> {
        let (seq, target) = keys::parse_dead_letter_queue(queue_key)
            .ok_or_else(|| txn::corrupt(queue_key, "bad dead-letter queue key"))?;
        let letter_key = keys::dead_letter(&target, seq);
        if let Some(value) = self.kv.get(&letter_key)? {
            stats.count = stats.count.saturating_sub(1);
            stats.bytes = stats.bytes.saturating_sub(u64::try_from(value.len()).unwrap_or(u64::MAX));
            self.kv.delete(&letter_key);
        }
        self.kv.delete(queue_key);
        Ok(())
    }

    /// Removes every dead letter addressed to `flow` (an operator deleted that id).
    fn delete_dead_letters_of(&mut self, flow: &FlowId) -> Res<()> {
        let letters = txn::scan_all(&*self.kv, &keys::dead_letters_prefix(flow))?;
        if letters.is_empty() {
            return Ok(());
        }
        let mut stats = self.dead_letter_stats()?;
        for (key, _) in letters {
            let (_, seq) =
                keys::parse_dead_letter(&key).ok_or_else(|| txn::corrupt(&key, "bad dead-letter key"))?;
            self.drop_dead_letter(&keys::dead_letter_queue(seq, flow), &mut stats)?;
        }
        txn::put(self.kv, keys::DEAD_LETTER_STATS.to_vec(), &stats)?;
        Ok(())
    }

    /// Removes up to `limit` dead letters that arrived before `cutoff_ms`, oldest first.
    fn collect_dead_letters(&mut self, cutoff_ms: u64, limit: usize) -> Res<()> {
        let due = self.kv.scan(keys::DEAD_LETTER_QUEUE, None, limit)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut stats = self.dead_letter_stats()?;
        for (key, value) in due {
            let at_ms: u64 = txn::decode(&key, &value)?;
            if at_ms >= cutoff_ms {
                break;
            }
            self.drop_dead_letter(&key, &mut stats)?;
        }
        txn::put(self.kv, keys::DEAD_LETTER_STATS.to_vec(), &stats)?;
        Ok(())
    }

    fn ack(&mut self, target: ShardId, upto_seq: u64) -> Res<ShardOutcome> {
        let prefix = keys::outbox_prefix(target);
        for (key, _) in txn::scan_all(&*self.kv, &prefix)? {
            let (_, seq) = keys::parse_outbox(&key).ok_or_else(|| txn::corrupt(&key, "bad outbox key"))?;
            if seq > upto_seq {
                break;
            }
            self.kv.delete(&key);
        }
        Ok(ShardOutcome::Done)
    }

    /// A control-panel mutation; the flow's epoch right after it (`None` after a delete).
    fn admin(&mut self, flow: &FlowId, expected_epoch: Option<Epoch>, op: &AdminOp) -> Res<Option<Epoch>> {
        let mut rec = self.load(flow)?.ok_or(Rejection::FlowNotFound)?;
        if let Some(expected) = expected_epoch {
            if expected != rec.epoch {
                return Err(Rejection::ConcurrentModification { expected, current: rec.epoch }.into());
            }
        }
        let finishes = matches!(op, AdminOp::Cancel | AdminOp::Succeed { .. } | AdminOp::Fail { .. });
        if finishes && rec.status.is_finished() {
            return Err(Rejection::FlowFinished.into());
        }
        match op {
            AdminOp::Delete => {
                self.delete_flow(&rec)?;
                self.delete_dead_letters_of(flow)?;
                self.act(Action::Fence { flow: flow.clone() });
                return Ok(None);
            }
            AdminOp::Cancel => {
                self.cancel(&mut rec, "cancelled by an operator")?;
                return Ok(Some(rec.epoch));
            }
            _ => {}
        }
        rec.epoch = bump(rec.epoch)?;
        self.act(Action::Fence { flow: flow.clone() });
        let was_running = rec.status == FlowStatus::Running;
        match op {
            AdminOp::Restart { input, clear_effects } => {
                if let Some(input) = input {
                    rec.input = input.clone();
                }
                if *clear_effects {
                    self.remove_all_timers(flow)?;
                    self.delete_prefix(&keys::effects_prefix(flow))?;
                    self.delete_prefix(&keys::events_prefix(flow))?;
                    self.delete_prefix(&keys::idem_prefix(flow))?;
                    rec.events_len = 0;
                    // A new run: `ctx.uuid` and `ctx.random` give new values.
                    rec.seed = self.next_seed()?;
                } else {
                    self.remove_timer(flow, POSTPONE_TIMER_ID)?;
                }
                if let Some(finished_ms) = rec.finished_ms.take() {
                    self.kv.delete(&keys::retention(finished_ms, flow));
                }
                rec.output = None;
                rec.error = None;
                rec.status = FlowStatus::Running;
                self.save(&mut rec, was_running)?;
                self.act(Action::Activate { flow: flow.clone() });
            }
            AdminOp::Succeed { output } => {
                self.finish(&mut rec, FlowStatus::Succeeded, Ok(output.clone()))?;
            }
            AdminOp::Fail { error } => {
                self.finish(&mut rec, FlowStatus::Failed, Err(error.clone()))?;
            }
            AdminOp::SetEffect { effect_id, record } => {
                self.put_effect(flow, effect_id, record)?;
                self.save(&mut rec, was_running)?;
                self.reactivate_if_running(&rec);
            }
            AdminOp::RemoveEffect { effect_id } => {
                self.kv.delete(&keys::effect(flow, effect_id));
                // A removed sleep is armed afresh by the next activation.
                self.remove_timer(flow, effect_id)?;
                self.save(&mut rec, was_running)?;
                self.reactivate_if_running(&rec);
            }
            AdminOp::Delete | AdminOp::Cancel => {}
        }
        Ok(Some(rec.epoch))
    }

    /// After fencing a running flow, it needs a new activation.
    fn reactivate_if_running(&mut self, rec: &FlowRecord) {
        if rec.status == FlowStatus::Running {
            self.act(Action::Activate { flow: rec.id.clone() });
        }
    }

    fn gc(&mut self, cutoff_ms: u64, max_flows: u32) -> Res<ShardOutcome> {
        let limit = usize::try_from(max_flows).unwrap_or(usize::MAX);
        let mut flows = 0u32;
        for (key, _) in self.kv.scan(keys::RETENTION, None, limit)? {
            let (finished_ms, flow) =
                keys::parse_retention(&key).ok_or_else(|| txn::corrupt(&key, "bad retention key"))?;
            if finished_ms >= cutoff_ms {
                break;
            }
            match self.load(&flow)? {
                Some(rec) if rec.finished_ms == Some(finished_ms) => {
                    self.delete_flow(&rec)?;
                    flows += 1;
                }
                // A stale index row (cannot happen, but never blocks collection).
                _ => self.kv.delete(&key),
            }
        }
        // Request ids are kept as long as finished flows: a retry within the retention period
        // still gets its first reply.
        for (key, _) in self.kv.scan(keys::REQUESTS_BY_AGE, None, limit)? {
            let (at_ms, _) =
                keys::parse_request_by_age(&key).ok_or_else(|| txn::corrupt(&key, "bad request-age key"))?;
            if at_ms >= cutoff_ms {
                break;
            }
            forget_request(self.kv, &key)?;
        }
        // Dead letters are kept for the retention period from their arrival, with the same bound
        // on the work of one command.
        self.collect_dead_letters(cutoff_ms, limit)?;
        Ok(ShardOutcome::Collected { flows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use crate::shard::read::*;

    const SHARDS: u32 = 4;
    const T0: u64 = 1_000;

    // --- builders ---

    fn f(instance: &str) -> FlowId {
        FlowId::new("order", instance)
    }

    fn p(json: &str) -> Payload {
        json.as_bytes().to_vec()
    }

    fn e(n: u64) -> Epoch {
        Epoch(n)
    }

    fn err(kind: &str) -> ErrorInfo {
        ErrorInfo { kind: kind.into(), message: format!("{kind}!") }
    }

    fn target_of(flow: &FlowId) -> ShardId {
        placement::shard_of(flow, SHARDS)
    }

    fn configure(shard: u32) -> ShardCommand {
        ShardCommand::Configure { shard_id: ShardId(shard), shard_count: SHARDS }
    }

    fn start(flow: &FlowId) -> ShardCommand {
        ShardCommand::Start { flow: flow.clone(), input: p("{}"), parent: None }
    }

    fn start_with(flow: &FlowId, input: &str, parent: Option<&FlowId>) -> ShardCommand {
        ShardCommand::Start { flow: flow.clone(), input: p(input), parent: parent.cloned() }
    }

    fn activate(flow: &FlowId, epoch: u64) -> ShardCommand {
        ShardCommand::Activate { flow: flow.clone(), epoch: e(epoch) }
    }

    fn eff_started(flow: &FlowId, epoch: u64, id: &str) -> ShardCommand {
        ShardCommand::EffectStarted {
            flow: flow.clone(),
            epoch: e(epoch),
            effect_id: id.into(),
            kind: EffectKind::Effect,
            type_name: "T".into(),
        }
    }

    fn eff_completed_kind(
        flow: &FlowId,
        epoch: u64,
        id: &str,
        kind: EffectKind,
        value: &str,
    ) -> ShardCommand {
        ShardCommand::EffectCompleted {
            flow: flow.clone(),
            epoch: e(epoch),
            effect_id: id.into(),
            kind,
            type_name: "T".into(),
            value: p(value),
        }
    }

    fn eff_completed(flow: &FlowId, epoch: u64, id: &str, value: &str) -> ShardCommand {
        eff_completed_kind(flow, epoch, id, EffectKind::Effect, value)
    }

    fn eff_failed(flow: &FlowId, epoch: u64, id: &str) -> ShardCommand {
        ShardCommand::EffectFailed {
            flow: flow.clone(),
            epoch: e(epoch),
            effect_id: id.into(),
            kind: EffectKind::Effect,
            type_name: "T".into(),
            error: err("boom"),
        }
    }

    fn eff_attempt_failed(flow: &FlowId, epoch: u64, id: &str, attempt: u32) -> ShardCommand {
        ShardCommand::EffectAttemptFailed {
            flow: flow.clone(),
            epoch: e(epoch),
            effect_id: id.into(),
            attempt,
            error: err("transient"),
            retry_at_ms: T0 + 100,
        }
    }

    fn state_set(flow: &FlowId, epoch: u64, id: &str, value: &str) -> ShardCommand {
        ShardCommand::StateSet {
            flow: flow.clone(),
            epoch: e(epoch),
            state_id: id.into(),
            type_name: "u32".into(),
            value: p(value),
        }
    }

    fn state_clear(flow: &FlowId, epoch: u64, id: &str) -> ShardCommand {
        ShardCommand::StateClear { flow: flow.clone(), epoch: e(epoch), state_id: id.into() }
    }

    fn message(body: &str, key: Option<&str>) -> Event {
        Event::Message { type_name: "Msg".into(), payload: p(body), idempotency_key: key.map(Into::into) }
    }

    fn append(flow: &FlowId, body: &str, key: Option<&str>) -> ShardCommand {
        ShardCommand::AppendEvent { flow: flow.clone(), event: message(body, key) }
    }

    fn suspend(flow: &FlowId, epoch: u64, events_seen: u64) -> ShardCommand {
        ShardCommand::Suspend { flow: flow.clone(), epoch: e(epoch), events_seen }
    }

    fn postpone(flow: &FlowId, epoch: u64, until_ms: u64) -> ShardCommand {
        ShardCommand::Postpone { flow: flow.clone(), epoch: e(epoch), until_ms }
    }

    fn arm(flow: &FlowId, epoch: u64, id: &str, deadline_ms: u64) -> ShardCommand {
        ShardCommand::ArmTimer { flow: flow.clone(), epoch: e(epoch), timer_id: id.into(), deadline_ms }
    }

    fn fire(flow: &FlowId, id: &str) -> ShardCommand {
        ShardCommand::FireTimer { flow: flow.clone(), timer_id: id.into() }
    }

    fn complete(flow: &FlowId, epoch: u64, output: &str) -> ShardCommand {
        ShardCommand::Complete { flow: flow.clone(), epoch: e(epoch), output: p(output) }
    }

    fn fail(flow: &FlowId, epoch: u64) -> ShardCommand {
        ShardCommand::Fail { flow: flow.clone(), epoch: e(epoch), error: err("user") }
    }

    fn send(flow: &FlowId, epoch: u64, id: &str, target: &FlowId) -> ShardCommand {
        ShardCommand::Send {
            flow: flow.clone(),
            epoch: e(epoch),
            effect_id: id.into(),
            target: target.clone(),
            type_name: "Msg".into(),
            payload: p("\"hi\""),
        }
    }

    fn start_child(flow: &FlowId, epoch: u64, id: &str, child: &FlowId) -> ShardCommand {
        ShardCommand::StartChild {
            flow: flow.clone(),
            epoch: e(epoch),
            effect_id: id.into(),
            child: child.clone(),
            input: p("{}"),
        }
    }

    fn deliver(source: u32, first_seq: u64, entries: Vec<OutboxEntry>) -> ShardCommand {
        ShardCommand::OutboxDeliver { source: ShardId(source), first_seq, entries }
    }

    fn ack(target: ShardId, upto_seq: u64) -> ShardCommand {
        ShardCommand::OutboxAck { target, upto_seq }
    }

    fn admin(flow: &FlowId, expected: Option<u64>, op: AdminOp) -> ShardCommand {
        ShardCommand::Admin { flow: flow.clone(), expected_epoch: expected.map(Epoch), op }
    }

    fn gc(cutoff_ms: u64, max_flows: u32) -> ShardCommand {
        ShardCommand::Gc { cutoff_ms, max_flows }
    }

    fn restart(input: Option<&str>, clear_effects: bool) -> AdminOp {
        AdminOp::Restart { input: input.map(p), clear_effects }
    }

    fn request(id: &str, flow: &FlowId, expected: Option<u64>, op: AdminOp) -> ShardCommand {
        ShardCommand::AdminRequest {
            request_id: id.into(),
            flow: flow.clone(),
            expected_epoch: expected.map(Epoch),
            op,
        }
    }

    /// The rows of `kv` other than the request-id table.
    fn without_requests(kv: &MemKv) -> Vec<(Vec<u8>, Vec<u8>)> {
        let tables = [b"Q".as_slice(), keys::REQUESTS_BY_AGE, keys::REQUEST_COUNT];
        kv.rows
            .iter()
            .filter(|(k, _)| !tables.iter().any(|t| k.starts_with(t)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn requests_stored(kv: &MemKv) -> u64 {
        txn::get(kv, keys::REQUEST_COUNT).unwrap().unwrap_or(0)
    }

    // --- a shard under test ---

    /// One shard's state and the batch time of the next command.
    struct Shard {
        kv: MemKv,
        now: u64,
    }

    impl Shard {
        /// A configured shard (shard 0 of [`SHARDS`]).
        fn new() -> Self {
            let mut shard = Shard::unconfigured();
            shard.ok(configure(0));
            shard
        }

        fn unconfigured() -> Self {
            Shard { kv: MemKv::new(), now: T0 }
        }

        /// Applies `cmd`; every rejection is checked to change nothing and emit nothing (but the
        /// request id a rejected request is remembered under).
        fn apply(&mut self, cmd: ShardCommand) -> (ShardReply, Vec<Action>) {
            let before = self.kv.clone();
            let (reply, actions) = apply(&mut self.kv, self.now, &cmd).unwrap();
            if reply.is_err() {
                assert_eq!(
                    without_requests(&self.kv),
                    without_requests(&before),
                    "rejected {cmd:?} changed the state"
                );
                assert!(actions.is_empty(), "rejected {cmd:?} emitted {actions:?}");
            }
            (reply, actions)
        }

        fn ok(&mut self, cmd: ShardCommand) -> ShardOutcome {
            self.ok_actions(cmd).0
        }

        fn ok_actions(&mut self, cmd: ShardCommand) -> (ShardOutcome, Vec<Action>) {
            let shown = format!("{cmd:?}");
            match self.apply(cmd) {
                (Ok(outcome), actions) => (outcome, actions),
                (Err(rejection), _) => panic!("{shown} rejected: {rejection:?}"),
            }
        }

        fn rej(&mut self, cmd: ShardCommand) -> Rejection {
            let shown = format!("{cmd:?}");
            match self.apply(cmd) {
                (Err(rejection), _) => rejection,
                (Ok(outcome), _) => panic!("{shown} accepted: {outcome:?}"),
            }
        }

        fn flow(&self, flow: &FlowId) -> FlowRecord {
            get_flow(&self.kv, flow).unwrap().expect("flow exists")
        }

        fn status(&self, flow: &FlowId) -> FlowStatus {
            self.flow(flow).status
        }

        /// Starts `flow` and activates it at epoch 1.
        fn running(&mut self, flow: &FlowId) {
            assert_eq!(self.ok(start(flow)), ShardOutcome::Started);
            assert_eq!(self.ok(activate(flow, 1)), ShardOutcome::Activated { epoch: e(1) });
        }

        fn outbox(&self, target: ShardId) -> Vec<(u64, OutboxEntry)> {
            outbox_pending(&self.kv, target, usize::MAX).unwrap()
        }

        fn rows_of(&self, flow: &FlowId) -> usize {
            let scope = keys::scope(flow);
            self.kv.rows.keys().filter(|k| k.starts_with(&scope)).count()
        }
    }

    // --- tests ---

    #[test]
    fn configure_rules() {
        let mut s = Shard::unconfigured();
        assert!(matches!(
            s.rej(ShardCommand::Configure { shard_id: ShardId(4), shard_count: 4 }),
            Rejection::Invalid(_)
        ));
        assert!(matches!(
            s.rej(ShardCommand::Configure { shard_id: ShardId(0), shard_count: 0 }),
            Rejection::Invalid(_)
        ));
        assert_eq!(s.ok(configure(2)), ShardOutcome::Done);
        assert_eq!(s.ok(configure(2)), ShardOutcome::Done);
        assert!(matches!(s.rej(configure(1)), Rejection::Invalid(_)));
        assert_eq!(
            shard_config(&s.kv).unwrap(),
            Some(ShardConfig { shard_id: ShardId(2), shard_count: SHARDS })
        );
    }

    #[test]
    fn start_is_idempotent_and_detects_input_mismatch() {
        let mut s = Shard::new();
        let a = f("a");
        let (outcome, actions) = s.ok_actions(start(&a));
        assert_eq!(outcome, ShardOutcome::Started);
        assert_eq!(actions, [Action::Activate { flow: a.clone() }]);
        let rec = s.flow(&a);
        assert_eq!(
            (rec.status, rec.epoch, rec.events_len, rec.created_ms, rec.parent),
            (FlowStatus::Running, e(0), 0, T0, None)
        );

        assert_eq!(
            s.ok_actions(start(&a)),
            (ShardOutcome::AlreadyExists { status: FlowStatus::Running }, vec![])
        );
        assert_eq!(s.rej(start_with(&a, "{\"x\":1}", None)), Rejection::InputMismatch);
        assert!(matches!(s.rej(start_with(&f("b"), "{}", Some(&f("b")))), Rejection::Invalid(_)));

        s.ok(start_with(&f("c"), "1", Some(&a)));
        assert_eq!(s.flow(&f("c")).parent, Some(a));
    }

    #[test]
    fn activate_epoch_rules() {
        let mut s = Shard::new();
        let a = f("a");
        assert_eq!(s.rej(activate(&a, 1)), Rejection::FlowNotFound);
        s.ok(start(&a));
        assert_eq!(s.rej(activate(&a, 0)), Rejection::StaleEpoch { got: e(0), current: e(0) });
        assert_eq!(s.rej(activate(&a, 2)), Rejection::StaleEpoch { got: e(2), current: e(0) });
        assert_eq!(s.ok_actions(activate(&a, 1)), (ShardOutcome::Activated { epoch: e(1) }, vec![]));
        assert_eq!(s.rej(activate(&a, 1)), Rejection::StaleEpoch { got: e(1), current: e(1) });

        // A suspended flow becomes running again.
        s.ok(suspend(&a, 1, 0));
        assert_eq!(s.ok(activate(&a, 2)), ShardOutcome::Activated { epoch: e(2) });
        assert_eq!(s.status(&a), FlowStatus::Running);

        // A finished flow takes no activation.
        s.ok(complete(&a, 2, "1"));
        assert_eq!(s.rej(activate(&a, 3)), Rejection::FlowFinished);
    }

    /// Every command of an activation, at `epoch`.
    fn activation_commands(flow: &FlowId, epoch: u64) -> Vec<ShardCommand> {
        vec![
            eff_started(flow, epoch, "x"),
            eff_completed(flow, epoch, "x", "1"),
            eff_failed(flow, epoch, "x"),
            state_set(flow, epoch, "s", "1"),
            state_clear(flow, epoch, "s"),
            suspend(flow, epoch, 0),
            postpone(flow, epoch, T0 + 10),
            arm(flow, epoch, "t", T0 + 10),
            complete(flow, epoch, "1"),
            fail(flow, epoch),
            send(flow, epoch, "m", &f("other")),
            start_child(flow, epoch, "c", &f("child")),
            eff_attempt_failed(flow, epoch, "x", 1),
            ShardCommand::Note { flow: flow.clone(), epoch: e(epoch), note: "n".into() },
        ]
    }

    #[test]
    fn a_note_stays_until_the_next_activation_or_the_end() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        let note =
            |epoch, text: &str| ShardCommand::Note { flow: a.clone(), epoch: e(epoch), note: text.into() };
        s.ok(note(1, "no node runs this type"));
        assert_eq!(note_of(&s.kv, &a).unwrap().as_deref(), Some("no node runs this type"));
        assert!(matches!(s.rej(note(1, &"x".repeat(MAX_NOTE_BYTES + 1))), Rejection::Invalid(_)));
        s.ok(activate(&a, 2));
        assert_eq!(note_of(&s.kv, &a).unwrap(), None, "a new activation clears the note");
        s.ok(note(2, "again"));
        s.ok(complete(&a, 2, "1"));
        assert_eq!(note_of(&s.kv, &a).unwrap(), None, "the end clears the note");
    }

    #[test]
    fn a_newer_activation_fences_every_command_of_the_old_one() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        s.ok(state_set(&a, 1, "s", "0"));
        s.ok(activate(&a, 2));
        for cmd in activation_commands(&a, 1) {
            assert_eq!(s.rej(cmd), Rejection::StaleEpoch { got: e(1), current: e(2) });
        }
        // The new activation works.
        for (i, cmd) in activation_commands(&a, 2).into_iter().enumerate() {
            if [0, 1, 3, 4].contains(&i) {
                s.ok(cmd);
            }
        }
    }

    #[test]
    fn activation_commands_need_an_existing_running_flow() {
        let mut s = Shard::new();
        let a = f("a");
        for cmd in activation_commands(&a, 0) {
            assert_eq!(s.rej(cmd), Rejection::FlowNotFound);
        }
        s.running(&a);
        s.ok(suspend(&a, 1, 0));
        for cmd in activation_commands(&a, 1) {
            assert_eq!(s.rej(cmd), Rejection::NotRunning);
        }
        s.ok(activate(&a, 2));
        s.ok(complete(&a, 2, "1"));
        for cmd in activation_commands(&a, 2) {
            assert_eq!(s.rej(cmd), Rejection::FlowFinished);
        }
    }

    #[test]
    fn effects_record_once() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);

        // At-most-once: Started, then the outcome.
        s.ok(eff_started(&a, 1, "ship"));
        assert_eq!(
            s.rej(eff_started(&a, 1, "ship")),
            Rejection::EffectAlreadyStarted { effect_id: "ship".into() }
        );
        assert_eq!(get_effect(&s.kv, &a, "ship").unwrap().unwrap().state, EffectState::Started);
        s.ok(eff_completed(&a, 1, "ship", "\"track\""));
        assert_eq!(
            get_effect(&s.kv, &a, "ship").unwrap().unwrap().state,
            EffectState::Completed(p("\"track\""))
        );
        assert_eq!(
            s.rej(eff_completed(&a, 1, "ship", "2")),
            Rejection::EffectAlreadyRecorded { effect_id: "ship".into() }
        );
        assert_eq!(
            s.rej(eff_failed(&a, 1, "ship")),
            Rejection::EffectAlreadyRecorded { effect_id: "ship".into() }
        );
        assert_eq!(
            s.rej(eff_started(&a, 1, "ship")),
            Rejection::EffectAlreadyStarted { effect_id: "ship".into() }
        );

        // At-least-once: the outcome directly, an error is recorded too.
        s.ok(eff_failed(&a, 1, "reserve"));
        assert_eq!(
            get_effect(&s.kv, &a, "reserve").unwrap().unwrap(),
            EffectRecord {
                kind: EffectKind::Effect,
                type_name: "T".into(),
                state: EffectState::Failed(err("boom"))
            }
        );
        assert_eq!(
            s.rej(eff_completed(&a, 1, "reserve", "1")),
            Rejection::EffectAlreadyRecorded { effect_id: "reserve".into() }
        );

        // Another kind under the same id is drift.
        s.ok(eff_started(&a, 1, "id"));
        assert_eq!(
            s.rej(eff_completed_kind(&a, 1, "id", EffectKind::Uuid, "1")),
            Rejection::KindMismatch {
                effect_id: "id".into(),
                recorded: EffectKind::Effect,
                requested: EffectKind::Uuid,
            }
        );
        s.ok(eff_completed_kind(&a, 1, "u", EffectKind::Uuid, "\"0000\""));
        assert_eq!(
            s.rej(eff_completed(&a, 1, "u", "1")),
            Rejection::KindMismatch {
                effect_id: "u".into(),
                recorded: EffectKind::Uuid,
                requested: EffectKind::Effect,
            }
        );

        let ids: Vec<String> = list_effects(&s.kv, &a).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["id", "reserve", "ship", "u"]);
    }

    #[test]
    fn a_failed_attempt_lets_the_next_one_start_and_a_started_one_stays_guarded() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        let attempt_failed = |n: u32| EffectRecord {
            kind: EffectKind::Effect,
            type_name: "T".into(),
            state: EffectState::AttemptFailed { attempt: n, error: err("transient"), retry_at_ms: T0 + 100 },
        };

        // Only an attempt in flight can fail and be retried.
        assert_eq!(
            s.rej(eff_attempt_failed(&a, 1, "ship", 1)),
            Rejection::EffectNotStarted { effect_id: "ship".into() }
        );
        s.ok(eff_started(&a, 1, "ship"));
        assert!(matches!(s.rej(eff_attempt_failed(&a, 1, "ship", 0)), Rejection::Invalid(_)));
        s.ok(eff_attempt_failed(&a, 1, "ship", 1));
        assert_eq!(get_effect(&s.kv, &a, "ship").unwrap().unwrap(), attempt_failed(1));
        assert_eq!(
            s.rej(eff_attempt_failed(&a, 1, "ship", 2)),
            Rejection::EffectNotStarted { effect_id: "ship".into() },
            "a failed attempt is not failed again before the next one starts"
        );

        // The next attempt starts, in a later activation too (the backoff suspended the flow).
        s.ok(activate(&a, 2));
        s.ok(eff_started(&a, 2, "ship"));
        assert_eq!(get_effect(&s.kv, &a, "ship").unwrap().unwrap().state, EffectState::Started);
        // The guard holds for the attempt in flight: its outcome is unknown until recorded.
        assert_eq!(
            s.rej(eff_started(&a, 2, "ship")),
            Rejection::EffectAlreadyStarted { effect_id: "ship".into() }
        );
        s.ok(eff_attempt_failed(&a, 2, "ship", 2));
        s.ok(eff_started(&a, 2, "ship"));
        s.ok(eff_completed(&a, 2, "ship", "\"track\""));
        assert_eq!(
            get_effect(&s.kv, &a, "ship").unwrap().unwrap().state,
            EffectState::Completed(p("\"track\""))
        );
        assert_eq!(
            s.rej(eff_attempt_failed(&a, 2, "ship", 3)),
            Rejection::EffectAlreadyRecorded { effect_id: "ship".into() }
        );
        assert_eq!(
            s.rej(eff_started(&a, 2, "ship")),
            Rejection::EffectAlreadyStarted { effect_id: "ship".into() }
        );

        // A failed attempt that will not be retried becomes the effect's outcome.
        s.ok(eff_started(&a, 2, "pay"));
        s.ok(eff_attempt_failed(&a, 2, "pay", 1));
        s.ok(eff_failed(&a, 2, "pay"));
        assert_eq!(get_effect(&s.kv, &a, "pay").unwrap().unwrap().state, EffectState::Failed(err("boom")));

        // The next attempt must be of the same kind.
        s.ok(eff_started(&a, 2, "id"));
        s.ok(eff_attempt_failed(&a, 2, "id", 1));
        let other_kind = ShardCommand::EffectStarted {
            flow: a.clone(),
            epoch: e(2),
            effect_id: "id".into(),
            kind: EffectKind::Uuid,
            type_name: "T".into(),
        };
        assert_eq!(
            s.rej(other_kind),
            Rejection::KindMismatch {
                effect_id: "id".into(),
                recorded: EffectKind::Effect,
                requested: EffectKind::Uuid
            }
        );
    }

    #[test]
    fn state_effects_overwrite_in_place() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        s.ok(state_set(&a, 1, "pos", "0"));
        let rows = s.kv.rows.len();
        for i in 1..50 {
            s.ok(state_set(&a, 1, "pos", &i.to_string()));
        }
        assert_eq!(s.kv.rows.len(), rows, "a state effect is one row whatever the number of sets");
        assert_eq!(get_effect(&s.kv, &a, "pos").unwrap().unwrap().state, EffectState::Completed(p("49")));

        s.ok(state_clear(&a, 1, "pos"));
        assert_eq!(get_effect(&s.kv, &a, "pos").unwrap(), None);
        assert_eq!(s.ok(state_clear(&a, 1, "pos")), ShardOutcome::Done);

        s.ok(eff_completed(&a, 1, "work", "1"));
        let mismatch = Rejection::KindMismatch {
            effect_id: "work".into(),
            recorded: EffectKind::Effect,
            requested: EffectKind::State,
        };
        assert_eq!(s.rej(state_set(&a, 1, "work", "2")), mismatch);
        assert_eq!(s.rej(state_clear(&a, 1, "work")), mismatch);
    }

    #[test]
    fn append_event_and_idempotency_keys() {
        let mut s = Shard::new();
        let a = f("a");
        assert_eq!(s.rej(append(&a, "1", None)), Rejection::FlowNotFound);
        s.running(&a);
        let (outcome, actions) = s.ok_actions(append(&a, "1", Some("k1")));
        assert_eq!(outcome, ShardOutcome::Appended { seq: 0 });
        assert_eq!(actions, [Action::EventAppended { flow: a.clone(), events_len: 1 }]);
        assert_eq!(s.ok(append(&a, "2", None)), ShardOutcome::Appended { seq: 1 });
        assert_eq!(s.ok(append(&a, "3", Some("k2"))), ShardOutcome::Appended { seq: 2 });

        // The same key again: acknowledged with the stored position, nothing stored.
        let before = s.kv.clone();
        assert_eq!(
            s.ok_actions(append(&a, "other body", Some("k1"))),
            (ShardOutcome::Duplicate { seq: 0 }, vec![])
        );
        assert_eq!(s.kv, before);
        // Keys are per flow.
        s.running(&f("b"));
        assert_eq!(s.ok(append(&f("b"), "1", Some("k1"))), ShardOutcome::Appended { seq: 0 });

        assert_eq!(s.flow(&a).events_len, 3);
        let log = events(&s.kv, &a, 0, 10).unwrap();
        assert_eq!(
            log,
            [(0, message("1", Some("k1"))), (1, message("2", None)), (2, message("3", Some("k2")))]
        );
        assert_eq!(events(&s.kv, &a, 1, 1).unwrap(), [(1, message("2", None))]);

        // Other event kinds go in the same log.
        let timer =
            ShardCommand::AppendEvent { flow: a.clone(), event: Event::TimerFired { timer_id: "t".into() } };
        assert_eq!(s.ok(timer), ShardOutcome::Appended { seq: 3 });

        s.ok(complete(&a, 1, "1"));
        assert_eq!(s.rej(append(&a, "late", None)), Rejection::FlowFinished);
        // A retry of an appended message is still acknowledged after the flow finished.
        let before = s.kv.clone();
        assert_eq!(s.ok(append(&a, "1", Some("k1"))), ShardOutcome::Duplicate { seq: 0 });
        assert_eq!(s.kv, before);
        assert_eq!(s.rej(append(&a, "new", Some("k9"))), Rejection::FlowFinished);
    }

    #[test]
    fn suspend_resume_race() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        // The activation read an empty log; a message arrives before its Suspend commits.
        s.ok(append(&a, "1", None));
        assert_eq!(s.ok(suspend(&a, 1, 0)), ShardOutcome::Resume { events_len: 1 });
        assert_eq!(s.status(&a), FlowStatus::Running);
        assert!(matches!(s.rej(suspend(&a, 1, 2)), Rejection::Invalid(_)));

        // Having seen it, it suspends: no activation needed any more.
        let (outcome, actions) = s.ok_actions(suspend(&a, 1, 1));
        assert_eq!((outcome, actions), (ShardOutcome::Suspended, vec![]));
        assert_eq!(s.status(&a), FlowStatus::Suspended);
        assert_eq!(running_flows(&s.kv, 10).unwrap(), Vec::<FlowId>::new());

        // The next event wakes it.
        let (outcome, actions) = s.ok_actions(append(&a, "2", None));
        assert_eq!(outcome, ShardOutcome::Appended { seq: 1 });
        assert_eq!(actions, [Action::Activate { flow: a.clone() }]);
        assert_eq!(s.status(&a), FlowStatus::Running);
        assert_eq!(running_flows(&s.kv, 10).unwrap(), [a]);
    }

    #[test]
    fn postpone_and_wake_by_its_timer() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        let (outcome, actions) = s.ok_actions(postpone(&a, 1, T0 + 500));
        assert_eq!(outcome, ShardOutcome::Done);
        let arm_action =
            Action::ArmTimer { flow: a.clone(), timer_id: POSTPONE_TIMER_ID.into(), deadline_ms: T0 + 500 };
        assert_eq!(actions, std::slice::from_ref(&arm_action));
        assert_eq!(s.status(&a), FlowStatus::Postponed { until_ms: T0 + 500 });
        assert_eq!(timers_of(&s.kv, &a).unwrap(), [(POSTPONE_TIMER_ID.to_string(), T0 + 500)]);
        assert_eq!(
            due_timers(&s.kv, u64::MAX, 10).unwrap(),
            [(T0 + 500, a.clone(), POSTPONE_TIMER_ID.to_string())]
        );

        // Events do not wake a postponed flow.
        assert_eq!(s.ok_actions(append(&a, "1", None)), (ShardOutcome::Appended { seq: 0 }, vec![]));
        assert_eq!(s.status(&a), FlowStatus::Postponed { until_ms: T0 + 500 });

        assert_eq!(s.rej(fire(&a, POSTPONE_TIMER_ID)), Rejection::TimerNotDue { deadline_ms: T0 + 500 });
        s.now = T0 + 500;
        let (outcome, actions) = s.ok_actions(fire(&a, POSTPONE_TIMER_ID));
        assert_eq!(outcome, ShardOutcome::TimerFired { fired: true });
        assert_eq!(actions, [Action::Activate { flow: a.clone() }]);
        assert_eq!(s.status(&a), FlowStatus::Running);
        assert_eq!(s.flow(&a).events_len, 1, "no event for a postpone timer");
        assert!(timers_of(&s.kv, &a).unwrap().is_empty());
        assert_eq!(s.ok(fire(&a, POSTPONE_TIMER_ID)), ShardOutcome::TimerFired { fired: false });

        // Activating a postponed flow early drops its timer.
        s.ok(activate(&a, 2));
        s.ok(postpone(&a, 2, T0 + 9_000));
        s.ok(activate(&a, 3));
        assert_eq!(s.status(&a), FlowStatus::Running);
        assert!(due_timers(&s.kv, u64::MAX, 10).unwrap().is_empty());
    }

    #[test]
    fn sleep_timer_arm_fire_and_wake() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        let deadline = T0 + 100;
        let (outcome, actions) = s.ok_actions(arm(&a, 1, "nap", deadline));
        assert_eq!(outcome, ShardOutcome::Done);
        assert_eq!(
            actions,
            [Action::ArmTimer { flow: a.clone(), timer_id: "nap".into(), deadline_ms: deadline }]
        );
        assert_eq!(
            get_effect(&s.kv, &a, "nap").unwrap().unwrap(),
            EffectRecord {
                kind: EffectKind::Sleep,
                type_name: SLEEP_TYPE_NAME.into(),
                state: EffectState::Completed(p("1100")),
            }
        );
        // Re-arming the same timer is idempotent; another deadline conflicts; the reserved id is refused.
        let rows = s.kv.clone();
        assert_eq!(s.ok(arm(&a, 1, "nap", deadline)), ShardOutcome::Done);
        assert_eq!(s.kv, rows);
        assert_eq!(
            s.rej(arm(&a, 1, "nap", deadline + 1)),
            Rejection::TimerConflict { timer_id: "nap".into() }
        );
        assert!(matches!(s.rej(arm(&a, 1, POSTPONE_TIMER_ID, deadline)), Rejection::Invalid(_)));
        s.ok(eff_completed(&a, 1, "work", "1"));
        assert!(matches!(s.rej(arm(&a, 1, "work", deadline)), Rejection::KindMismatch { .. }));

        assert_eq!(s.ok(fire(&a, "unknown")), ShardOutcome::TimerFired { fired: false });
        assert_eq!(s.ok(fire(&f("nobody"), "nap")), ShardOutcome::TimerFired { fired: false });
        assert_eq!(s.rej(fire(&a, "nap")), Rejection::TimerNotDue { deadline_ms: deadline });

        s.ok(suspend(&a, 1, 0));
        s.now = deadline + 5;
        let (outcome, actions) = s.ok_actions(fire(&a, "nap"));
        assert_eq!(outcome, ShardOutcome::TimerFired { fired: true });
        assert_eq!(actions, [Action::Activate { flow: a.clone() }]);
        assert_eq!(s.status(&a), FlowStatus::Running);
        assert_eq!(events(&s.kv, &a, 0, 10).unwrap(), [(0, Event::TimerFired { timer_id: "nap".into() })]);
        assert!(timers_of(&s.kv, &a).unwrap().is_empty());

        // Firing again is a no-op; re-arming a fired sleep (replay) does not arm it again.
        assert_eq!(s.ok(fire(&a, "nap")), ShardOutcome::TimerFired { fired: false });
        s.ok(activate(&a, 2));
        assert_eq!(s.ok_actions(arm(&a, 2, "nap", deadline)), (ShardOutcome::Done, vec![]));
        assert!(due_timers(&s.kv, u64::MAX, 10).unwrap().is_empty());
        assert_eq!(
            s.rej(arm(&a, 2, "nap", deadline + 1)),
            Rejection::TimerConflict { timer_id: "nap".into() }
        );
        assert_eq!(s.flow(&a).events_len, 1);

        // A running flow gets EventAppended instead.
        s.ok(arm(&a, 2, "nap2", s.now));
        let (_, actions) = s.ok_actions(fire(&a, "nap2"));
        assert_eq!(actions, [Action::EventAppended { flow: a.clone(), events_len: 2 }]);
    }

    #[test]
    fn due_timers_are_in_deadline_order() {
        let mut s = Shard::new();
        for (i, deadline) in [(1, 300), (2, 100), (3, 200)] {
            let flow = f(&format!("t{i}"));
            s.running(&flow);
            s.ok(arm(&flow, 1, "x", deadline));
        }
        let due = due_timers(&s.kv, 250, 10).unwrap();
        assert_eq!(due, [(100, f("t2"), "x".to_string()), (200, f("t3"), "x".to_string())]);
        assert_eq!(due_timers(&s.kv, u64::MAX, 1).unwrap().len(), 1);
    }

    #[test]
    fn timers_and_running_flows_page_through_everything_once() {
        let mut s = Shard::new();
        let mut flows = Vec::new();
        for i in 0..23 {
            let flow = f(&format!("p{i}"));
            s.running(&flow);
            // Equal deadlines in pairs: the page boundary may split a deadline.
            s.ok(arm(&flow, 1, "x", 100 + i / 2));
            flows.push(flow);
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = timers_after(&s.kv, after.as_ref(), u64::MAX, 5).unwrap();
            seen.extend(page.iter().map(|(_, flow, _)| flow.clone()));
            if page.len() < 5 {
                break;
            }
            after = page.last().cloned();
        }
        assert_eq!(seen.len(), 23, "every timer exactly once");
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 23);
        // The bound applies inside a page too.
        assert_eq!(timers_after(&s.kv, None, 101, 50).unwrap().len(), 4);

        let mut running = Vec::new();
        let mut after: Option<FlowId> = None;
        loop {
            let page = running_flows_after(&s.kv, after.as_ref(), 4).unwrap();
            running.extend(page.iter().cloned());
            if page.len() < 4 {
                break;
            }
            after = page.last().cloned();
        }
        assert_eq!(running, running_flows(&s.kv, usize::MAX).unwrap());
        assert_eq!(running.len(), 23);
    }

    #[test]
    fn complete_and_fail_finish_and_notify_the_parent() {
        let mut s = Shard::new();
        let parent = f("parent");
        let child = f("child");
        s.ok(start_with(&child, "{}", Some(&parent)));
        s.ok(activate(&child, 1));
        s.ok(arm(&child, 1, "nap", T0 + 50));
        s.now = T0 + 10;
        let (outcome, actions) = s.ok_actions(complete(&child, 1, "42"));
        assert_eq!(outcome, ShardOutcome::Done);
        let target = target_of(&parent);
        assert_eq!(
            actions,
            [
                Action::DeliverOutbox { target },
                Action::Finished { flow: child.clone(), status: FlowStatus::Succeeded }
            ]
        );
        let rec = s.flow(&child);
        assert_eq!(
            (rec.status, rec.output, rec.finished_ms),
            (FlowStatus::Succeeded, Some(p("42")), Some(T0 + 10))
        );
        assert!(timers_of(&s.kv, &child).unwrap().is_empty());
        assert!(due_timers(&s.kv, u64::MAX, 10).unwrap().is_empty());
        assert_eq!(
            s.outbox(target),
            [(
                1,
                OutboxEntry::ChildResult {
                    parent: parent.clone(),
                    child: child.clone(),
                    result: Ok(p("42"))
                }
            )]
        );

        // Fail: the error goes to the parent; a flow without a parent writes no outbox entry.
        let child2 = f("child2");
        s.ok(start_with(&child2, "{}", Some(&parent)));
        s.ok(activate(&child2, 1));
        s.ok(fail(&child2, 1));
        assert_eq!(s.flow(&child2).error, Some(err("user")));
        assert_eq!(
            s.outbox(target).last().unwrap().1,
            OutboxEntry::ChildResult { parent: parent.clone(), child: child2, result: Err(err("user")) }
        );
        let root = f("root");
        s.running(&root);
        let (_, actions) = s.ok_actions(fail(&root, 1));
        assert_eq!(actions, [Action::Finished { flow: root, status: FlowStatus::Failed }]);
        assert_eq!(s.outbox(target).len(), 2);
    }

    #[test]
    fn outbox_writes_need_a_configured_shard() {
        let mut s = Shard::unconfigured();
        let parent = f("parent");
        let child = f("child");
        s.ok(start_with(&child, "{}", Some(&parent)));
        s.ok(activate(&child, 1));
        assert_eq!(s.rej(complete(&child, 1, "1")), Rejection::Invalid("shard not configured".into()));
        s.running(&parent);
        assert_eq!(s.rej(send(&parent, 1, "m", &child)), Rejection::Invalid("shard not configured".into()));
        // Flows without cross-shard effects work unconfigured.
        s.ok(complete(&parent, 1, "1"));
        s.ok(configure(0));
        s.ok(complete(&child, 1, "1"));
    }

    #[test]
    fn send_and_start_child_write_exactly_one_outbox_entry() {
        let mut s = Shard::new();
        let a = f("a");
        let b = f("b");
        let kid = f("kid");
        s.running(&a);

        let (outcome, actions) = s.ok_actions(send(&a, 1, "greet", &b));
        assert_eq!(outcome, ShardOutcome::Done);
        assert_eq!(actions, [Action::DeliverOutbox { target: target_of(&b) }]);
        let effect = get_effect(&s.kv, &a, "greet").unwrap().unwrap();
        assert_eq!((effect.kind, effect.state), (EffectKind::Send, EffectState::Completed(p("null"))));
        assert_eq!(
            s.rej(send(&a, 1, "greet", &b)),
            Rejection::EffectAlreadyRecorded { effect_id: "greet".into() }
        );
        let sent = OutboxEntry::FlowMessage {
            sender: a.clone(),
            target: b.clone(),
            type_name: "Msg".into(),
            payload: p("\"hi\""),
            idempotency_key: Some(format!("order/a#greet@s0>{}:1", target_of(&b))),
        };

        let (_, actions) = s.ok_actions(start_child(&a, 1, "spawn", &kid));
        assert_eq!(actions, [Action::DeliverOutbox { target: target_of(&kid) }]);
        let effect = get_effect(&s.kv, &a, "spawn").unwrap().unwrap();
        assert_eq!(effect.kind, EffectKind::Child);
        let EffectState::Completed(value) = effect.state else { panic!("child effect not completed") };
        assert_eq!(serde_json::from_slice::<FlowId>(&value).unwrap(), kid);
        assert_eq!(
            s.rej(start_child(&a, 1, "spawn", &kid)),
            Rejection::EffectAlreadyRecorded { effect_id: "spawn".into() }
        );
        assert!(matches!(s.rej(start_child(&a, 1, "self", &a)), Rejection::Invalid(_)));
        assert!(matches!(s.rej(send(&a, 1, "spawn", &b)), Rejection::KindMismatch { .. }));
        let spawned = OutboxEntry::StartChild { child: kid.clone(), input: p("{}"), parent: a.clone() };

        let mut all: Vec<OutboxEntry> =
            outbox_targets(&s.kv).unwrap().into_iter().flat_map(|t| s.outbox(t)).map(|(_, e)| e).collect();
        all.sort_by_key(|e| format!("{e:?}"));
        let mut expected = vec![sent, spawned];
        expected.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(all, expected);

        // Numbers are per target and start at 1.
        for target in outbox_targets(&s.kv).unwrap() {
            assert_eq!(s.outbox(target).first().unwrap().0, 1);
        }
        let c = f("c");
        s.ok(send(&a, 1, "again", &b));
        s.ok(send(&a, 1, "third", &c));
        let to_b: Vec<u64> = s.outbox(target_of(&b)).into_iter().map(|(seq, _)| seq).collect();
        assert!(to_b.windows(2).all(|w| w[1] == w[0] + 1), "{to_b:?}");
    }

    /// A batch another shard (7) might send: a child start, a message and a child result.
    fn batch(parent: &FlowId) -> Vec<OutboxEntry> {
        vec![
            OutboxEntry::StartChild { child: f("kid"), input: p("{}"), parent: f("remote-parent") },
            OutboxEntry::Message {
                target: parent.clone(),
                type_name: "Msg".into(),
                payload: p("1"),
                idempotency_key: Some("x/y#m".into()),
            },
            OutboxEntry::ChildResult { parent: parent.clone(), child: f("remote-kid"), result: Ok(p("7")) },
        ]
    }

    #[test]
    fn outbox_delivery_is_exactly_once() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        let (outcome, actions) = s.ok_actions(deliver(7, 1, batch(&a)));
        assert_eq!(outcome, ShardOutcome::Delivered { applied: 3, duplicates: 0 });
        assert_eq!(
            actions,
            [
                Action::Activate { flow: f("kid") },
                Action::EventAppended { flow: a.clone(), events_len: 1 },
                Action::EventAppended { flow: a.clone(), events_len: 2 },
            ]
        );
        assert_eq!(inbound_applied(&s.kv, ShardId(7)).unwrap(), 3);
        assert_eq!(s.flow(&f("kid")).parent, Some(f("remote-parent")));
        assert_eq!(s.flow(&a).events_len, 2);

        // The same batch again: all duplicates, nothing changes.
        let before = s.kv.clone();
        assert_eq!(
            s.ok_actions(deliver(7, 1, batch(&a))),
            (ShardOutcome::Delivered { applied: 0, duplicates: 3 }, vec![])
        );
        assert_eq!(s.kv, before);

        // An overlapping batch applies only the new tail.
        let mut overlapping = batch(&a);
        overlapping.push(OutboxEntry::Message {
            target: a.clone(),
            type_name: "Msg".into(),
            payload: p("2"),
            idempotency_key: None,
        });
        let tail = overlapping.split_off(1);
        assert_eq!(s.ok(deliver(7, 2, tail)), ShardOutcome::Delivered { applied: 1, duplicates: 2 });
        assert_eq!(inbound_applied(&s.kv, ShardId(7)).unwrap(), 4);
        assert_eq!(s.flow(&a).events_len, 3);

        // A gap is refused whole; other sources are numbered independently.
        assert_eq!(
            s.rej(deliver(7, 6, batch(&a))),
            Rejection::OutboxGap { source_shard: ShardId(7), expected: 5, got: 6 }
        );
        assert_eq!(
            s.rej(deliver(8, 2, batch(&a))),
            Rejection::OutboxGap { source_shard: ShardId(8), expected: 1, got: 2 }
        );
        assert_eq!(s.ok(deliver(8, 1, vec![])), ShardOutcome::Delivered { applied: 0, duplicates: 0 });
        assert!(matches!(s.rej(deliver(8, u64::MAX, batch(&a))), Rejection::Invalid(_)));
    }

    #[test]
    fn delivered_entries_follow_the_flow_rules() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        s.ok(start_with(&f("taken"), "\"other\"", None));
        let parent_elsewhere = f("p");
        let entries = vec![
            // Same message twice (e.g. a sender restarted from scratch): stored once.
            OutboxEntry::Message {
                target: a.clone(),
                type_name: "M".into(),
                payload: p("1"),
                idempotency_key: Some("k".into()),
            },
            OutboxEntry::Message {
                target: a.clone(),
                type_name: "M".into(),
                payload: p("1"),
                idempotency_key: Some("k".into()),
            },
            // A message to a missing target becomes a dead letter; the rest are skipped.
            OutboxEntry::Message {
                target: f("ghost"),
                type_name: "M".into(),
                payload: p("1"),
                idempotency_key: None,
            },
            OutboxEntry::ChildResult { parent: f("ghost"), child: f("x"), result: Ok(p("1")) },
            OutboxEntry::CancelChild { child: f("ghost") },
            // A start whose id is taken by a flow with another input: the parent hears at once.
            OutboxEntry::StartChild { child: f("taken"), input: p("{}"), parent: parent_elsewhere.clone() },
        ];
        assert_eq!(s.ok(deliver(3, 1, entries)), ShardOutcome::Delivered { applied: 6, duplicates: 0 });
        assert_eq!(s.flow(&a).events_len, 1);
        assert!(get_flow(&s.kv, &f("ghost")).unwrap().is_none());
        assert_eq!(s.flow(&f("taken")).parent, None);
        let notice = s.outbox(target_of(&parent_elsewhere));
        assert!(matches!(
            &notice[..],
            [(1, OutboxEntry::ChildResult { result: Err(ErrorInfo { kind, .. }), .. })] if kind == "input_mismatch"
        ));

        // A message for a finished flow becomes a dead letter; a child result is skipped.
        s.ok(complete(&a, 1, "1"));
        let late = vec![
            OutboxEntry::Message {
                target: a.clone(),
                type_name: "M".into(),
                payload: p("2"),
                idempotency_key: None,
            },
            OutboxEntry::ChildResult { parent: a.clone(), child: f("x"), result: Ok(p("1")) },
        ];
        assert_eq!(s.ok(deliver(3, 7, late)), ShardOutcome::Delivered { applied: 2, duplicates: 0 });
        assert_eq!(s.flow(&a).events_len, 1);
    }

    #[test]
    fn outbox_ack_removes_delivered_rows() {
        let mut s = Shard::new();
        let a = f("a");
        let b = f("b");
        let t = target_of(&b);
        s.running(&a);
        for i in 0..3 {
            s.ok(send(&a, 1, &format!("m{i}"), &b));
        }
        assert_eq!(s.outbox(t).len(), 3);
        assert_eq!(outbox_targets(&s.kv).unwrap(), [t]);
        s.ok(ack(t, 2));
        assert_eq!(s.outbox(t).into_iter().map(|(seq, _)| seq).collect::<Vec<_>>(), [3]);
        let before = s.kv.clone();
        assert_eq!(s.ok(ack(t, 2)), ShardOutcome::Done);
        assert_eq!(s.kv, before);
        s.ok(ack(t, 99));
        assert!(s.outbox(t).is_empty());
        assert!(outbox_targets(&s.kv).unwrap().is_empty());
        // Numbers never restart.
        s.ok(send(&a, 1, "m3", &b));
        assert_eq!(s.outbox(t)[0].0, 4);
        assert_eq!(outbox_last_seq(&s.kv, t).unwrap(), 4);
    }

    #[test]
    fn outbox_reads_for_delivery_are_bounded_by_count_and_bytes() {
        let mut s = Shard::new();
        let a = f("a");
        let b = f("b");
        let t = target_of(&b);
        s.running(&a);
        for i in 0..40 {
            s.ok(send(&a, 1, &format!("m{i}"), &b));
        }
        let all = s.outbox(t);
        assert_eq!(all.len(), 40);
        // Pages are read past the first one, and the count bound holds.
        assert_eq!(outbox_pending_within(&s.kv, t, 1000, usize::MAX).unwrap(), all);
        assert_eq!(outbox_pending_within(&s.kv, t, 17, usize::MAX).unwrap(), all[..17]);
        // The byte bound stops before the row that would pass it; the first always goes.
        let row =
            |i: usize| crate::kv::KvRead::get(&s.kv, &keys::outbox(t, all[i].0)).unwrap().unwrap().len();
        let three = row(0) + row(1) + row(2);
        assert_eq!(outbox_pending_within(&s.kv, t, 1000, three).unwrap(), all[..3]);
        assert_eq!(outbox_pending_within(&s.kv, t, 1000, three - 1).unwrap(), all[..2]);
        assert_eq!(outbox_pending_within(&s.kv, t, 1000, 1).unwrap(), all[..1]);
    }

    #[test]
    fn admin_checks_existence_and_expected_epoch() {
        let mut s = Shard::new();
        let a = f("a");
        assert_eq!(s.rej(admin(&a, None, AdminOp::Cancel)), Rejection::FlowNotFound);
        s.running(&a);
        let ops = [
            restart(None, false),
            AdminOp::Cancel,
            AdminOp::Succeed { output: p("1") },
            AdminOp::Fail { error: err("x") },
            AdminOp::Delete,
            AdminOp::SetEffect {
                effect_id: "x".into(),
                record: EffectRecord {
                    kind: EffectKind::Effect,
                    type_name: "T".into(),
                    state: EffectState::Started,
                },
            },
            AdminOp::RemoveEffect { effect_id: "x".into() },
        ];
        for op in ops {
            assert_eq!(
                s.rej(admin(&a, Some(0), op)),
                Rejection::ConcurrentModification { expected: e(0), current: e(1) }
            );
        }
        assert_eq!(
            s.ok(admin(&a, Some(1), AdminOp::RemoveEffect { effect_id: "x".into() })),
            ShardOutcome::Done
        );
    }

    #[test]
    fn admin_restart() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        s.ok(eff_completed(&a, 1, "one", "1"));
        s.ok(append(&a, "m", Some("k")));
        s.ok(arm(&a, 1, "nap", T0 + 100));

        // Keep effects: a new epoch fences the old activation, and the flow is activated again.
        let (_, actions) = s.ok_actions(admin(&a, Some(1), restart(None, false)));
        assert_eq!(actions, [Action::Fence { flow: a.clone() }, Action::Activate { flow: a.clone() }]);
        assert_eq!(s.flow(&a).epoch, e(2));
        assert_eq!(
            s.rej(eff_completed(&a, 1, "two", "2")),
            Rejection::StaleEpoch { got: e(1), current: e(2) }
        );
        assert!(get_effect(&s.kv, &a, "one").unwrap().is_some());
        assert_eq!(timers_of(&s.kv, &a).unwrap().len(), 1);

        // A finished flow runs again and leaves the retention index.
        s.ok(activate(&a, 3));
        s.ok(complete(&a, 3, "\"done\""));
        s.ok(admin(&a, None, restart(None, false)));
        let rec = s.flow(&a);
        assert_eq!((rec.status, rec.output, rec.finished_ms), (FlowStatus::Running, None, None));
        assert_eq!(s.ok(gc(u64::MAX, 10)), ShardOutcome::Collected { flows: 0 });

        // Clear effects and replace the input: a fresh start under the same id.
        s.ok(admin(&a, None, restart(Some("\"new\""), true)));
        let rec = s.flow(&a);
        assert_eq!((rec.input, rec.events_len, rec.epoch), (p("\"new\""), 0, e(5)));
        assert_eq!(s.rows_of(&a), 0, "effects, events, keys and timers are gone");
        assert!(due_timers(&s.kv, u64::MAX, 10).unwrap().is_empty());
        s.ok(activate(&a, 6));
        assert_eq!(s.ok(append(&a, "m", Some("k"))), ShardOutcome::Appended { seq: 0 });

        // Restarting a postponed flow drops its postpone timer.
        s.ok(postpone(&a, 6, T0 + 1_000));
        s.ok(admin(&a, None, restart(None, false)));
        assert_eq!(s.status(&a), FlowStatus::Running);
        assert!(timers_of(&s.kv, &a).unwrap().is_empty());
    }

    #[test]
    fn admin_succeed_and_fail_finish_by_hand() {
        let mut s = Shard::new();
        let parent = f("parent");
        let a = f("a");
        s.ok(start_with(&a, "{}", Some(&parent)));
        s.ok(activate(&a, 1));
        let (_, actions) = s.ok_actions(admin(&a, None, AdminOp::Succeed { output: p("5") }));
        assert_eq!(
            actions,
            [
                Action::Fence { flow: a.clone() },
                Action::DeliverOutbox { target: target_of(&parent) },
                Action::Finished { flow: a.clone(), status: FlowStatus::Succeeded }
            ]
        );
        let rec = s.flow(&a);
        assert_eq!((rec.status, rec.output, rec.epoch), (FlowStatus::Succeeded, Some(p("5")), e(2)));
        assert_eq!(s.outbox(target_of(&parent)).len(), 1);
        assert_eq!(s.rej(admin(&a, None, AdminOp::Fail { error: err("x") })), Rejection::FlowFinished);
        assert_eq!(s.rej(admin(&a, None, AdminOp::Succeed { output: p("6") })), Rejection::FlowFinished);
        assert_eq!(s.rej(admin(&a, None, AdminOp::Cancel)), Rejection::FlowFinished);

        let b = f("b");
        s.ok(start(&b));
        s.ok(admin(&b, Some(0), AdminOp::Fail { error: err("manual") }));
        let rec = s.flow(&b);
        assert_eq!((rec.status, rec.error), (FlowStatus::Failed, Some(err("manual"))));
    }

    #[test]
    fn admin_set_and_remove_effect() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        s.ok(eff_started(&a, 1, "ship"));
        s.ok(arm(&a, 1, "nap", T0 + 100));
        let repaired = EffectRecord {
            kind: EffectKind::Effect,
            type_name: "T".into(),
            state: EffectState::Completed(p("\"manual\"")),
        };
        let (_, actions) = s.ok_actions(admin(
            &a,
            Some(1),
            AdminOp::SetEffect { effect_id: "ship".into(), record: repaired.clone() },
        ));
        assert_eq!(actions, [Action::Fence { flow: a.clone() }, Action::Activate { flow: a.clone() }]);
        assert_eq!(get_effect(&s.kv, &a, "ship").unwrap(), Some(repaired));
        assert_eq!(s.flow(&a).epoch, e(2));

        // Removing a sleep also disarms it, so the next activation may arm it afresh.
        s.ok(admin(&a, None, AdminOp::RemoveEffect { effect_id: "nap".into() }));
        assert_eq!(get_effect(&s.kv, &a, "nap").unwrap(), None);
        assert!(timers_of(&s.kv, &a).unwrap().is_empty());
        s.ok(activate(&a, 4));
        s.ok(arm(&a, 4, "nap", T0 + 500));

        // Allowed on a finished flow (repair, then restart); no activation for it.
        s.ok(fail(&a, 4));
        let (_, actions) = s.ok_actions(admin(&a, None, AdminOp::RemoveEffect { effect_id: "ship".into() }));
        assert_eq!(actions, [Action::Fence { flow: a.clone() }]);
        assert_eq!(s.status(&a), FlowStatus::Failed);
    }

    /// A start appended by a leader commits the first activation with it: epoch 1, claimed by
    /// that leader; another node's `Activate` (epoch 2) fences it like any older activation.
    #[test]
    fn a_start_appended_by_a_leader_carries_its_first_activation() {
        let mut s = Shard::new();
        let a = f("a");
        let (reply, actions) = apply_at(&mut s.kv, s.now, Some(NodeId(7)), &start(&a)).unwrap();
        assert_eq!(reply, Ok(ShardOutcome::Started));
        assert_eq!(actions, vec![Action::Started { flow: a.clone(), epoch: e(1), by: NodeId(7) }]);
        assert_eq!(s.flow(&a).epoch, e(1));
        assert_eq!(s.flow(&a).status, FlowStatus::Running);
        s.ok(eff_completed(&a, 1, "x", "1"));
        s.ok(activate(&a, 2));
        assert!(matches!(s.rej(eff_completed(&a, 1, "y", "1")), Rejection::StaleEpoch { .. }));
        // The same start again changes nothing and asks for nothing.
        let (reply, actions) = apply_at(&mut s.kv, s.now, Some(NodeId(7)), &start(&a)).unwrap();
        assert_eq!(reply, Ok(ShardOutcome::AlreadyExists { status: FlowStatus::Running }));
        assert!(actions.is_empty());
    }

    #[test]
    fn admin_delete_frees_the_id() {
        let mut s = Shard::new();
        let a = f("a");
        let rows_before = s.kv.clone();
        s.running(&a);
        s.ok(eff_completed(&a, 1, "x", "1"));
        s.ok(append(&a, "m", Some("k")));
        s.ok(arm(&a, 1, "nap", T0 + 100));
        s.ok(start_child(&a, 1, "c", &f("kid")));
        s.ok(complete(&a, 1, "1"));
        let (outcome, actions) = s.ok_actions(admin(&a, None, AdminOp::Delete));
        assert_eq!((outcome, actions), (ShardOutcome::Done, vec![Action::Fence { flow: a.clone() }]));
        assert_eq!(get_flow(&s.kv, &a).unwrap(), None);
        // Only the outbox entry for the child (in flight, owned by the shard) and the shard's
        // run-seed counter (seeds are never given out twice) remain.
        let mut left = s.kv.clone();
        left.rows.retain(|k, _| !k.starts_with(keys::OUTBOX) && !k.starts_with(b"N") && k != keys::SEEDS);
        assert_eq!(left, rows_before);

        assert_eq!(s.ok(start(&a)), ShardOutcome::Started);
        assert_eq!(s.flow(&a).epoch, e(0));
        assert_eq!(s.ok(append(&a, "m", Some("k"))), ShardOutcome::Appended { seq: 0 });
    }

    /// Every shard of a [`SHARDS`]-shard cluster, indexed by shard id; flows live where they hash.
    struct Cluster {
        shards: Vec<Shard>,
    }

    impl Cluster {
        fn new() -> Self {
            let shards = (0..SHARDS)
                .map(|i| {
                    let mut shard = Shard::unconfigured();
                    shard.ok(configure(i));
                    shard
                })
                .collect();
            Cluster { shards }
        }

        /// The shard that owns `flow`.
        fn at(&mut self, flow: &FlowId) -> &mut Shard {
            &mut self.shards[target_of(flow).0 as usize]
        }

        /// Delivers and acknowledges every pending outbox entry, as the leaders would, until
        /// nothing is pending.
        fn pump(&mut self) {
            loop {
                let mut moved = false;
                for source in 0..self.shards.len() {
                    for target in outbox_targets(&self.shards[source].kv).unwrap() {
                        let pending = self.shards[source].outbox(target);
                        let first = pending[0].0;
                        let last = pending[pending.len() - 1].0;
                        let entries = pending.into_iter().map(|(_, e)| e).collect();
                        self.shards[target.0 as usize].ok(deliver(source as u32, first, entries));
                        self.shards[source].ok(ack(target, last));
                        moved = true;
                    }
                }
                if !moved {
                    return;
                }
            }
        }
    }

    #[test]
    fn admin_cancel_cascades_to_children() {
        let mut c = Cluster::new();
        let parent = f("p-1");
        let kids = [f("k-1"), f("k-2")];
        let grandkid = f("g-1");
        c.at(&parent).running(&parent);
        for (i, kid) in kids.iter().enumerate() {
            c.at(&parent).ok(start_child(&parent, 1, &format!("c{i}"), kid));
        }
        c.pump();
        for kid in &kids {
            assert_eq!(c.at(kid).flow(kid).parent, Some(parent.clone()));
            c.at(kid).ok(activate(kid, 1));
        }
        c.at(&kids[0]).ok(start_child(&kids[0], 1, "g", &grandkid));
        c.pump();
        c.at(&grandkid).ok(activate(&grandkid, 1));

        let (_, actions) = c.at(&parent).ok_actions(admin(&parent, Some(1), AdminOp::Cancel));
        assert_eq!(actions.first(), Some(&Action::Fence { flow: parent.clone() }));
        assert_eq!(
            actions.last(),
            Some(&Action::Finished { flow: parent.clone(), status: FlowStatus::Cancelled })
        );
        let rec = c.at(&parent).flow(&parent);
        assert_eq!(
            (rec.status, rec.error.map(|e| e.kind)),
            (FlowStatus::Cancelled, Some("cancelled".into()))
        );
        for kid in &kids {
            let pending = c.at(&parent).outbox(target_of(kid));
            assert!(pending.iter().any(|(_, e)| *e == OutboxEntry::CancelChild { child: kid.clone() }));
        }

        c.pump();
        for flow in kids.iter().chain([&grandkid]) {
            let rec = c.at(flow).flow(flow);
            assert_eq!(rec.status, FlowStatus::Cancelled, "{flow}");
            assert_eq!(rec.epoch, e(2), "the activation of {flow} is fenced");
        }
        // The cancelled parent ignored its children's results; nothing is left in flight.
        assert_eq!(c.at(&parent).flow(&parent).events_len, 0);
        assert!(c.shards.iter().all(|s| outbox_targets(&s.kv).unwrap().is_empty()));
    }

    #[test]
    fn child_results_reach_the_parent_across_shards() {
        let mut c = Cluster::new();
        let parent = f("p-2");
        let kid = f("k-9");
        c.at(&parent).running(&parent);
        c.at(&parent).ok(start_child(&parent, 1, "c", &kid));
        c.pump();
        c.at(&kid).ok(activate(&kid, 1));
        c.at(&kid).ok(complete(&kid, 1, "\"ok\""));
        c.pump();
        let log = events(&c.at(&parent).kv, &parent, 0, 10).unwrap();
        assert_eq!(log, [(0, Event::ChildResult { child: kid.clone(), result: Ok(p("\"ok\"")) })]);
        // A send that runs again after its effect was removed is a new message at the target.
        c.at(&parent).ok(send(&parent, 1, "m", &kid));
        c.at(&parent).ok(admin(&parent, None, AdminOp::RemoveEffect { effect_id: "m".into() }));
        c.at(&parent).ok(activate(&parent, 3));
        c.at(&parent).ok(send(&parent, 3, "m", &kid));
        c.at(&kid).ok(admin(&kid, None, restart(None, false)));
        c.pump();
        assert_eq!(c.at(&kid).flow(&kid).events_len, 2, "the re-run send is delivered again");
    }

    /// Whether some row of the shard holds `needle` (the bytes of a payload).
    fn holds(kv: &MemKv, needle: &[u8]) -> bool {
        kv.rows.values().any(|v| v.windows(needle.len()).any(|w| w == needle))
    }

    #[test]
    fn messages_to_missing_or_finished_flows_are_kept_as_dead_letters() {
        let mut s = Shard::new();
        let done = f("done");
        s.running(&done);
        s.ok(complete(&done, 1, "1"));
        let letter = |target: &FlowId, body: &str| OutboxEntry::Message {
            target: target.clone(),
            type_name: "Msg".into(),
            payload: p(body),
            idempotency_key: Some(format!("order/x#{body}")),
        };
        let entries = vec![letter(&f("ghost"), "\"to-the-ghost\""), letter(&done, "\"too-late\"")];
        assert_eq!(s.ok(deliver(5, 1, entries)), ShardOutcome::Delivered { applied: 2, duplicates: 0 });
        assert_eq!(s.flow(&done).events_len, 0, "a finished flow takes no events");
        assert!(get_flow(&s.kv, &f("ghost")).unwrap().is_none(), "a letter creates no flow");
        assert!(holds(&s.kv, b"\"to-the-ghost\""), "the letter to a missing flow is kept");
        assert!(holds(&s.kv, b"\"too-late\""), "the letter to a finished flow is kept");

        let ghost = dead_letters_of(&s.kv, &f("ghost"), None, 10).unwrap();
        assert_eq!(
            ghost,
            [DeadLetter {
                seq: 1,
                target: f("ghost"),
                sender: None,
                type_name: "Msg".into(),
                payload: p("\"to-the-ghost\""),
                idempotency_key: Some("order/x#\"to-the-ghost\"".into()),
                reason: DeadLetterReason::NotFound,
                at_ms: T0,
            }]
        );
        let late = dead_letters_of(&s.kv, &done, None, 10).unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].reason, DeadLetterReason::Finished { status: FlowStatus::Succeeded });
        // The listing of the shard goes by target, then arrival.
        let all: Vec<(FlowId, u64)> =
            dead_letters_after(&s.kv, None, 10).unwrap().into_iter().map(|l| (l.target, l.seq)).collect();
        assert_eq!(all, [(done.clone(), 2), (f("ghost"), 1)]);
        assert_eq!(dead_letters_after(&s.kv, Some((&done, 2)), 10).unwrap().len(), 1);
        assert_eq!(dead_letter_stats(&s.kv).unwrap().count, 2);

        // A message from a flow names its sender; one the finished target already holds under the
        // same key is not a letter (it was delivered before the target finished).
        let live = f("live");
        s.running(&live);
        let from = |target: &FlowId, key: &str| OutboxEntry::FlowMessage {
            sender: f("sender"),
            target: target.clone(),
            type_name: "Msg".into(),
            payload: p("3"),
            idempotency_key: Some(key.into()),
        };
        s.ok(deliver(5, 3, vec![from(&live, "k-1")]));
        s.ok(complete(&live, 1, "1"));
        s.ok(deliver(5, 4, vec![from(&live, "k-1"), from(&live, "k-2"), from(&f("ghost"), "k-3")]));
        let letters = dead_letters_of(&s.kv, &live, None, 10).unwrap();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].sender, Some(f("sender")));
        assert_eq!(letters[0].idempotency_key.as_deref(), Some("k-2"));
        assert_eq!(dead_letters_of(&s.kv, &f("ghost"), Some(1), 10).unwrap().len(), 1, "a page after seq 1");

        // An operator's delete of an id removes the letters addressed to it.
        s.ok(deliver(5, 7, vec![from(&done, "k-5")]));
        s.ok(admin(&done, None, AdminOp::Delete));
        assert!(dead_letters_of(&s.kv, &done, None, 10).unwrap().is_empty());
        assert_eq!(dead_letter_stats(&s.kv).unwrap().count, 3);

        // Retention: letters older than the cutoff go, within the bound of the command.
        s.now = T0 + 100;
        s.ok(deliver(5, 8, vec![from(&f("ghost"), "k-4")]));
        assert_eq!(dead_letter_stats(&s.kv).unwrap().count, 4);
        s.ok(gc(T0 + 1, 1));
        assert_eq!(dead_letter_stats(&s.kv).unwrap().count, 3, "one per command");
        s.ok(gc(T0 + 1, 10));
        let stats = dead_letter_stats(&s.kv).unwrap();
        assert_eq!((stats.count, stats.evicted, stats.last_seq), (1, 0, 6));
        let left = dead_letters_after(&s.kv, None, 10).unwrap();
        assert_eq!(left.iter().map(|l| l.seq).collect::<Vec<_>>(), [6]);
        let stored: u64 =
            s.kv.rows.iter().filter(|(k, _)| k.starts_with(b"L")).map(|(_, v)| v.len() as u64).sum();
        assert_eq!(stats.bytes, stored);
    }

    #[test]
    fn dead_letters_are_bounded_oldest_first() {
        let mut s = Shard::new();
        let ghost = f("ghost");
        let n = MAX_DEAD_LETTERS + 3;
        let entries: Vec<OutboxEntry> = (0..n)
            .map(|i| OutboxEntry::Message {
                target: ghost.clone(),
                type_name: "Msg".into(),
                payload: p(&i.to_string()),
                idempotency_key: None,
            })
            .collect();
        s.ok(deliver(2, 1, entries));
        let stats = dead_letter_stats(&s.kv).unwrap();
        assert_eq!((stats.count, stats.evicted, stats.last_seq), (MAX_DEAD_LETTERS, 3, n));
        let first = dead_letters_of(&s.kv, &ghost, None, 1).unwrap();
        assert_eq!(first[0].seq, 4, "the three oldest were dropped");

        // Bytes bound it too: one large letter pushes out as many old ones as it needs.
        let big = vec![b'7'; (MAX_DEAD_LETTER_BYTES / 2) as usize];
        for seq in [n + 1, n + 2, n + 3] {
            let entry = OutboxEntry::Message {
                target: ghost.clone(),
                type_name: "Msg".into(),
                payload: big.clone(),
                idempotency_key: None,
            };
            s.ok(deliver(2, seq, vec![entry]));
        }
        let stats = dead_letter_stats(&s.kv).unwrap();
        assert!(stats.bytes <= MAX_DEAD_LETTER_BYTES, "{stats:?}");
        assert_eq!(stats.count, 1, "only the newest large letter fits: {stats:?}");
        // Every small letter and the first two large ones made room.
        assert_eq!(stats.evicted, 3 + MAX_DEAD_LETTERS + 2);
    }

    #[test]
    fn a_send_rerun_after_a_repair_is_delivered_again_and_a_replay_once() {
        let mut c = Cluster::new();
        let sender = f("s-1");
        let receiver = f("r-1");
        c.at(&receiver).running(&receiver);
        c.at(&sender).running(&sender);
        c.at(&sender).ok(send(&sender, 1, "go", &receiver));
        c.pump();
        assert_eq!(c.at(&receiver).flow(&receiver).events_len, 1);

        // A replay finds the send recorded and proposes nothing; a stale proposal is refused.
        c.at(&sender).ok(activate(&sender, 2));
        assert_eq!(
            c.at(&sender).rej(send(&sender, 2, "go", &receiver)),
            Rejection::EffectAlreadyRecorded { effect_id: "go".into() }
        );
        c.pump();
        assert_eq!(c.at(&receiver).flow(&receiver).events_len, 1, "a replay delivers nothing new");

        // The operator removes the send effect: the re-run is a new delivery.
        c.at(&sender).ok(admin(&sender, None, AdminOp::RemoveEffect { effect_id: "go".into() }));
        c.at(&sender).ok(activate(&sender, 4));
        c.at(&sender).ok(send(&sender, 4, "go", &receiver));
        c.pump();
        assert_eq!(c.at(&receiver).flow(&receiver).events_len, 2, "the re-run after effect-remove arrives");

        // A restart without its effects: the re-run is a new delivery too.
        c.at(&sender).ok(admin(&sender, None, restart(None, true)));
        c.at(&sender).ok(activate(&sender, 6));
        c.at(&sender).ok(send(&sender, 6, "go", &receiver));
        c.pump();
        assert_eq!(c.at(&receiver).flow(&receiver).events_len, 3, "the re-run after --clear-effects arrives");

        // The delivery of the last send again (a new leader resending before its ack): once.
        let target = target_of(&receiver);
        let source = target_of(&sender);
        let applied = inbound_applied(&c.at(&receiver).kv, source).unwrap();
        let again = OutboxEntry::Message {
            target: receiver.clone(),
            type_name: "Msg".into(),
            payload: p("\"hi\""),
            idempotency_key: None,
        };
        let outcome = c.at(&receiver).ok(deliver(source.0, applied, vec![again]));
        assert_eq!(outcome, ShardOutcome::Delivered { applied: 0, duplicates: 1 });
        assert_eq!(c.at(&receiver).flow(&receiver).events_len, 3);
        assert!(target.0 < SHARDS);
    }

    #[test]
    fn a_child_start_rerun_after_a_repair_reaches_the_child_again() {
        let mut c = Cluster::new();
        let parent = f("p-3");
        let kid = f("k-3");
        c.at(&parent).running(&parent);
        c.at(&parent).ok(start_child(&parent, 1, "c", &kid));
        c.pump();
        c.at(&kid).ok(activate(&kid, 1));
        c.at(&kid).ok(complete(&kid, 1, "\"ok\""));
        c.pump();
        assert_eq!(c.at(&parent).flow(&parent).events_len, 1);

        // Restarted without its effects (its log is cleared), the parent starts the child again
        // and hears its result again.
        c.at(&parent).ok(admin(&parent, None, restart(None, true)));
        c.at(&parent).ok(activate(&parent, 3));
        c.at(&parent).ok(start_child(&parent, 3, "c", &kid));
        c.pump();
        let log = events(&c.at(&parent).kv, &parent, 0, 10).unwrap();
        assert_eq!(log, [(0, Event::ChildResult { child: kid.clone(), result: Ok(p("\"ok\"")) })]);

        // The child was deleted meanwhile: the re-run after effect-remove starts it afresh.
        c.at(&kid).ok(admin(&kid, None, AdminOp::Delete));
        c.at(&parent).ok(admin(&parent, None, AdminOp::RemoveEffect { effect_id: "c".into() }));
        c.at(&parent).ok(activate(&parent, 5));
        c.at(&parent).ok(start_child(&parent, 5, "c", &kid));
        c.pump();
        assert_eq!(c.at(&kid).status(&kid), FlowStatus::Running, "the child runs again");
        assert_eq!(c.at(&kid).flow(&kid).parent, Some(parent.clone()));
    }

    #[test]
    fn gc_deletes_old_finished_flows_up_to_the_bound() {
        let mut s = Shard::new();
        for (i, at) in [(1, 1_000), (2, 2_000), (3, 3_000)] {
            let flow = f(&format!("done-{i}"));
            s.now = at;
            s.running(&flow);
            s.ok(eff_completed(&flow, 1, "x", "1"));
            s.ok(complete(&flow, 1, "1"));
        }
        s.running(&f("live"));
        assert_eq!(s.ok(gc(2_500, 0)), ShardOutcome::Collected { flows: 0 });
        assert_eq!(s.ok(gc(2_500, 1)), ShardOutcome::Collected { flows: 1 });
        assert!(get_flow(&s.kv, &f("done-1")).unwrap().is_none());
        assert_eq!(s.rows_of(&f("done-1")), 0);
        assert!(get_flow(&s.kv, &f("done-2")).unwrap().is_some());
        assert_eq!(s.ok(gc(2_500, 10)), ShardOutcome::Collected { flows: 1 });
        assert_eq!(s.ok(gc(2_500, 10)), ShardOutcome::Collected { flows: 0 });
        assert!(get_flow(&s.kv, &f("done-3")).unwrap().is_some());
        assert_eq!(s.ok(gc(3_000, 10)), ShardOutcome::Collected { flows: 0 }, "the cutoff is exclusive");
        assert_eq!(s.ok(gc(3_001, 10)), ShardOutcome::Collected { flows: 1 });
        assert!(get_flow(&s.kv, &f("live")).unwrap().is_some());
    }

    #[test]
    fn a_retried_restart_with_clear_effects_changes_nothing() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        s.ok(eff_started(&a, 1, "ship"));
        let restart_once = request("r-1", &a, None, restart(None, true));
        let (first, actions) = s.ok_actions(restart_once.clone());
        assert_eq!(first, ShardOutcome::Mutated { epoch: Some(e(2)) });
        assert_eq!(actions, [Action::Fence { flow: a.clone() }, Action::Activate { flow: a.clone() }]);
        assert!(get_effect(&s.kv, &a, "ship").unwrap().is_none(), "the restart forgot the effect");
        // The restarted run commits its at-most-once marker, then the restart is retried.
        s.ok(activate(&a, 3));
        s.ok(eff_started(&a, 3, "ship"));
        let before = s.kv.clone();
        s.now += 1_000;
        assert_eq!(s.apply(restart_once.clone()), (Ok(first.clone()), Vec::new()));
        assert_eq!(s.kv, before, "the retry changed nothing, not even the clock");
        assert_eq!(get_effect(&s.kv, &a, "ship").unwrap().map(|r| r.state), Some(EffectState::Started));
        assert_eq!(s.flow(&a).epoch, e(3));
        // The same id for another request is refused; a new id restarts again.
        assert_eq!(
            s.rej(request("r-1", &a, None, restart(None, false))),
            Rejection::RequestIdReused { request_id: "r-1".into() }
        );
        assert_eq!(
            s.ok(request("r-2", &a, None, restart(None, true))),
            ShardOutcome::Mutated { epoch: Some(e(4)) }
        );
        assert_eq!(requests_stored(&s.kv), 2);
    }

    #[test]
    fn retried_requests_answer_their_first_reply() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        // Cancel: success, then the same success (not "already finished").
        let cancel = request("c-1", &a, None, AdminOp::Cancel);
        assert_eq!(s.ok(cancel.clone()), ShardOutcome::Mutated { epoch: Some(e(2)) });
        assert_eq!(s.apply(cancel.clone()), (Ok(ShardOutcome::Mutated { epoch: Some(e(2)) }), Vec::new()));
        assert_eq!(s.rej(admin(&a, None, AdminOp::Cancel)), Rejection::FlowFinished);
        // Delete: the flow is gone, and the retry still answers success.
        let delete = request("d-1", &a, None, AdminOp::Delete);
        assert_eq!(s.ok(delete.clone()), ShardOutcome::Mutated { epoch: None });
        assert_eq!(s.ok(delete), ShardOutcome::Mutated { epoch: None });
        assert!(get_flow(&s.kv, &a).unwrap().is_none());
        // A rejection is remembered: after the flow exists, the retry still answers "not found"
        // and does not succeed it.
        let b = f("b");
        let succeed = request("s-1", &b, None, AdminOp::Succeed { output: p("1") });
        assert_eq!(s.rej(succeed.clone()), Rejection::FlowNotFound);
        s.running(&b);
        assert_eq!(s.rej(succeed), Rejection::FlowNotFound);
        assert_eq!(s.status(&b), FlowStatus::Running);
        // Every operation is covered, and a conditional one answers its first outcome too.
        let effect = EffectRecord {
            kind: EffectKind::Effect,
            type_name: "T".into(),
            state: EffectState::Completed(p("1")),
        };
        for (id, op) in [
            ("e-1", AdminOp::SetEffect { effect_id: "x".into(), record: effect }),
            ("e-2", AdminOp::RemoveEffect { effect_id: "x".into() }),
            ("f-1", AdminOp::Fail { error: err("x") }),
        ] {
            let epoch = s.flow(&b).epoch;
            let cmd = request(id, &b, Some(epoch.0), op);
            let first = s.ok(cmd.clone());
            let before = s.kv.clone();
            assert_eq!(s.apply(cmd), (Ok(first), Vec::new()), "{id}");
            assert_eq!(s.kv, before, "{id}");
        }
        assert_eq!(s.status(&b), FlowStatus::Failed);
    }

    #[test]
    fn request_ids_are_checked_collected_and_bounded() {
        let mut s = Shard::new();
        let a = f("a");
        s.running(&a);
        for bad in [String::new(), "x".repeat(MAX_REQUEST_ID_BYTES + 1)] {
            assert!(matches!(s.rej(request(&bad, &a, None, AdminOp::Cancel)), Rejection::Invalid(_)));
        }
        assert_eq!(requests_stored(&s.kv), 0, "an invalid id is not stored");
        assert_eq!(s.status(&a), FlowStatus::Running);
        // Collected with the finished flows of the same age (the cutoff is exclusive).
        s.now = 2_000;
        s.ok(request("old", &a, None, restart(None, false)));
        s.now = 3_000;
        s.ok(request("new", &a, None, restart(None, false)));
        s.ok(gc(3_000, 10));
        assert_eq!(requests_stored(&s.kv), 1);
        let epoch = s.flow(&a).epoch;
        assert_eq!(
            s.ok(request("new", &a, None, restart(None, false))),
            ShardOutcome::Mutated { epoch: Some(epoch) }
        );
        assert_eq!(s.flow(&a).epoch, epoch, "a kept id still answers");
        let again = s.ok(request("old", &a, None, restart(None, false)));
        assert_eq!(
            again,
            ShardOutcome::Mutated { epoch: Some(e(epoch.0 + 1)) },
            "a collected id is new again"
        );
        // At the bound, the oldest id makes room.
        txn::put(&mut s.kv, keys::REQUEST_COUNT.to_vec(), &MAX_REQUEST_IDS).unwrap();
        s.ok(request("newest", &a, None, restart(None, false)));
        assert_eq!(requests_stored(&s.kv), MAX_REQUEST_IDS - 1 + 1);
        assert!(!s.kv.rows.contains_key(&keys::request("new")), "the oldest went");
        assert!(s.kv.rows.contains_key(&keys::request("old")));
        assert!(s.kv.rows.contains_key(&keys::request("newest")));
    }

    #[test]
    fn clock_is_monotonic() {
        let mut s = Shard::new();
        assert_eq!(shard_clock(&s.kv).unwrap(), T0);
        s.now = 5_000;
        s.running(&f("a"));
        assert_eq!(shard_clock(&s.kv).unwrap(), 5_000);
        s.now = 10;
        s.ok(start(&f("b")));
        assert_eq!(shard_clock(&s.kv).unwrap(), 5_000);
        assert_eq!(s.flow(&f("b")).created_ms, 5_000, "time never goes backwards");
        // A timer due by the shard clock fires even if this batch's time is earlier.
        s.ok(arm(&f("a"), 1, "t", 4_000));
        assert_eq!(s.ok(fire(&f("a"), "t")), ShardOutcome::TimerFired { fired: true });
        // A rejection does not move the clock.
        s.now = 9_000;
        s.rej(activate(&f("zzz"), 1));
        assert_eq!(shard_clock(&s.kv).unwrap(), 5_000);
        s.ok(start(&f("c")));
        assert_eq!(shard_clock(&s.kv).unwrap(), 9_000);
    }

    #[test]
    fn list_flows_pages_by_id() {
        let mut s = Shard::new();
        for i in 0..5 {
            s.ok(start(&f(&format!("o-{i}"))));
        }
        s.ok(start(&FlowId::new("mail", "m-1")));
        let ids = |v: Vec<FlowRecord>| v.into_iter().map(|r| r.id.instance).collect::<Vec<_>>();
        assert_eq!(ids(list_flows(&s.kv, Some("order"), None, 2).unwrap()), ["o-0", "o-1"]);
        assert_eq!(
            ids(list_flows(&s.kv, Some("order"), Some(&f("o-1")), 10).unwrap()),
            ["o-2", "o-3", "o-4"]
        );
        assert_eq!(ids(list_flows(&s.kv, Some("mail"), None, 10).unwrap()), ["m-1"]);
        assert_eq!(list_flows(&s.kv, None, None, 100).unwrap().len(), 6);
        assert!(list_flows(&s.kv, Some("none"), None, 10).unwrap().is_empty());
    }

    /// A mixed sequence of commands over a few flows, with batch times.
    fn scenario() -> Vec<(u64, ShardCommand)> {
        let (a, b, c, kid) = (f("a"), f("b"), f("c"), f("kid"));
        vec![
            (100, configure(0)),
            (100, start(&a)),
            (101, start(&b)),
            (102, start(&c)),
            (103, activate(&a, 1)),
            (104, activate(&b, 1)),
            (105, activate(&c, 1)),
            (106, eff_started(&a, 1, "ship")),
            (106, eff_attempt_failed(&a, 1, "ship", 1)),
            (106, eff_started(&a, 1, "ship")),
            (107, eff_completed(&a, 1, "ship", "1")),
            (108, state_set(&a, 1, "pos", "3")),
            (109, arm(&a, 1, "nap", 500)),
            (110, suspend(&a, 1, 0)),
            (111, send(&b, 1, "hello", &a)),
            (112, start_child(&b, 1, "spawn", &kid)),
            (113, postpone(&c, 1, 900)),
            (114, append(&b, "x", Some("dup"))),
            (115, append(&b, "x", Some("dup"))),
            (50, activate(&a, 1)),
            (116, deliver(2, 1, batch(&b))),
            (117, deliver(2, 1, batch(&b))),
        ]
    }

    fn run_all(kv: &mut MemKv, cmds: &[(u64, ShardCommand)]) -> Vec<(ShardReply, Vec<Action>)> {
        cmds.iter().map(|(now, cmd)| apply(kv, *now, cmd).unwrap()).collect()
    }

    #[test]
    fn a_new_leader_finds_its_work_in_state() {
        let mut kv = MemKv::new();
        run_all(&mut kv, &scenario());
        let mut activations = running_flows(&kv, 100).unwrap();
        activations.sort();
        // a is suspended (waiting for its timer), c postponed; b and kid (started by the batch) run.
        assert_eq!(activations, [f("b"), f("kid")]);
        assert_eq!(
            due_timers(&kv, u64::MAX, 100).unwrap(),
            [(500, f("a"), "nap".to_string()), (900, f("c"), POSTPONE_TIMER_ID.to_string())]
        );
        let mut expected = vec![target_of(&f("a")), target_of(&f("kid"))];
        expected.sort();
        expected.dedup();
        assert_eq!(outbox_targets(&kv).unwrap(), expected);
        let empty = MemKv::new();
        assert!(running_flows(&empty, 10).unwrap().is_empty());
        assert!(due_timers(&empty, u64::MAX, 10).unwrap().is_empty());
        assert!(outbox_targets(&empty).unwrap().is_empty());
    }

    #[test]
    fn same_commands_give_same_state_and_replies() {
        let mut one = MemKv::new();
        let mut two = MemKv::new();
        let r1 = run_all(&mut one, &scenario());
        let r2 = run_all(&mut two, &scenario());
        assert_eq!(r1, r2);
        assert_eq!(one, two);
        assert!(one.rows.keys().all(|k| k.first().is_some_and(u8::is_ascii_graphic)));
    }

    #[test]
    fn snapshot_then_restore_gives_identical_state() {
        let mut live = MemKv::new();
        run_all(&mut live, &scenario());
        // A snapshot is a copy of the rows; a restored replica starts from it.
        let mut restored = MemKv::new();
        for (k, v) in &live.rows {
            restored.put(k.clone(), v.clone());
        }
        let (a, b, kid) = (f("a"), f("b"), f("kid"));
        let further = vec![
            (600, fire(&a, "nap")),
            (601, activate(&a, 2)),
            (602, complete(&a, 2, "1")),
            (603, activate(&kid, 1)),
            (604, fail(&kid, 1)),
            (605, admin(&b, Some(1), AdminOp::Cancel)),
            (606, ack(target_of(&a), 1)),
            (700, gc(650, 10)),
        ];
        assert_eq!(run_all(&mut live, &further), run_all(&mut restored, &further));
        assert_eq!(live, restored);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut s = Shard::new();
        // Random bytes: undecodable, or a command that is applied or cleanly rejected.
        for len in 0..400 {
            let mut buf = vec![crate::codec::FORMAT_VERSION];
            buf.extend((0..len).map(|_| next() as u8));
            if let Ok(cmd) = crate::codec::decode::<ShardCommand>(&buf) {
                s.now = next() % 10_000;
                let _ = s.apply(cmd);
            }
        }
        // Random well-formed commands over a few ids, so that they interact.
        let flows = [f("a"), f("b"), f("c"), FlowId::new("", "")];
        let ids = ["x", "y", POSTPONE_TIMER_ID, ""];
        for _ in 0..5_000 {
            let fl = &flows[(next() % 4) as usize];
            let other = &flows[(next() % 4) as usize];
            let id = ids[(next() % 4) as usize];
            let ep = next() % 4;
            let t = next() % 3_000;
            let cmd = match next() % 22 {
                0 => start_with(
                    fl,
                    if next() % 2 == 0 { "{}" } else { "1" },
                    (next() % 2 == 0).then_some(other),
                ),
                1 => activate(fl, ep),
                2 => eff_started(fl, ep, id),
                3 => eff_completed(fl, ep, id, "1"),
                4 => eff_failed(fl, ep, id),
                5 => state_set(fl, ep, id, "2"),
                6 => state_clear(fl, ep, id),
                7 => append(fl, "m", (next() % 2 == 0).then_some(id)),
                8 => suspend(fl, ep, next() % 4),
                9 => postpone(fl, ep, t),
                10 => arm(fl, ep, id, t),
                11 => fire(fl, id),
                12 => complete(fl, ep, "1"),
                13 => fail(fl, ep),
                14 => send(fl, ep, id, other),
                15 => start_child(fl, ep, id, other),
                16 => {
                    let entries = vec![
                        OutboxEntry::StartChild { child: fl.clone(), input: p("{}"), parent: other.clone() },
                        OutboxEntry::CancelChild { child: other.clone() },
                        OutboxEntry::ChildResult {
                            parent: fl.clone(),
                            child: other.clone(),
                            result: Ok(p("1")),
                        },
                    ];
                    deliver((next() % 2) as u32, next() % 6, entries)
                }
                17 => ack(ShardId((next() % 4) as u32), next() % 5),
                18 => admin(
                    fl,
                    (next() % 2 == 0).then_some(ep),
                    match next() % 7 {
                        0 => restart(None, next() % 2 == 0),
                        1 => AdminOp::Cancel,
                        2 => AdminOp::Succeed { output: p("1") },
                        3 => AdminOp::Fail { error: err("x") },
                        4 => AdminOp::Delete,
                        5 => AdminOp::SetEffect {
                            effect_id: id.into(),
                            record: EffectRecord {
                                kind: EffectKind::Sleep,
                                type_name: "".into(),
                                state: EffectState::Started,
                            },
                        },
                        _ => AdminOp::RemoveEffect { effect_id: id.into() },
                    },
                ),
                19 => gc(t, (next() % 3) as u32),
                20 => ShardCommand::Activate { flow: fl.clone(), epoch: Epoch(u64::MAX) },
                _ => configure((next() % 5) as u32),
            };
            s.now = next() % 3_000;
            let _ = s.apply(cmd);
            // Invariants: the running index matches the records; timers point at live flows.
            let running = running_flows(&s.kv, usize::MAX).unwrap();
            let records = list_flows(&s.kv, None, None, usize::MAX).unwrap();
            let expected: Vec<FlowId> =
                records.iter().filter(|r| r.status == FlowStatus::Running).map(|r| r.id.clone()).collect();
            assert_eq!(running, expected);
            for (_, flow, _) in due_timers(&s.kv, u64::MAX, usize::MAX).unwrap() {
                let rec = records.iter().find(|r| r.id == flow).expect("timer of a live flow");
                assert!(!rec.status.is_finished());
            }
        }
        // Corrupt rows are errors, never panics.
        let a = f("a");
        s.kv.put(keys::flow(&a), vec![crate::codec::FORMAT_VERSION, 0xff, 0xff, 0xff]);
        assert!(matches!(apply(&mut s.kv, 0, &start(&a)), Err(KvError::Corrupt { .. })));
        assert!(get_flow(&s.kv, &a).is_err());
    }
}
