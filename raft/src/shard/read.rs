//! Pure reads of a shard's state, for the runtime (replay, the leader's executor, the control
//! panel) and for tests. Each takes the state as a [`Kv`] and never writes.

use serde::{Deserialize, Serialize};

use super::command::{DeadLetter, DeadLetterStats, EffectRecord, Event, FlowRecord, OutboxEntry};
use super::keys;
use super::txn;
use crate::ids::{FlowId, ShardId};
use crate::kv::{KvError, KvRead, Rows};

/// The reserved timer id of a flow's postpone timer ([`super::ShardCommand::Postpone`]). Flows
/// cannot arm a timer with this id.
pub const POSTPONE_TIMER_ID: &str = "__postpone";

/// The type name recorded on the `Sleep` effect that `ArmTimer` writes (its value is the deadline
/// in ms as a JSON number).
pub const SLEEP_TYPE_NAME: &str = "u64";

/// At most this many dead letters are kept per shard; beyond it the oldest are dropped (and
/// counted in [`DeadLetterStats::evicted`]).
pub const MAX_DEAD_LETTERS: u64 = 10_000;

/// At most this many stored bytes of dead letters are kept per shard (the newest letter always
/// stays, whatever its size); beyond it the oldest are dropped.
pub const MAX_DEAD_LETTER_BYTES: u64 = 64 << 20;

/// What a shard knows about itself ([`super::ShardCommand::Configure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfig {
    /// This shard.
    pub shard_id: ShardId,
    /// The cluster's shard count.
    pub shard_count: u32,
}

fn decode_all<T: serde::de::DeserializeOwned>(rows: Rows) -> Result<Vec<T>, KvError> {
    rows.into_iter().map(|(k, v)| txn::decode(&k, &v)).collect()
}

/// The shard's configuration, once configured.
pub fn shard_config(kv: &dyn KvRead) -> Result<Option<ShardConfig>, KvError> {
    txn::get(kv, keys::CONFIG)
}

/// The shard clock: the largest batch time applied so far (ms), 0 before any.
pub fn shard_clock(kv: &dyn KvRead) -> Result<u64, KvError> {
    Ok(txn::get(kv, keys::CLOCK)?.unwrap_or(0))
}

/// The record of `flow`.
pub fn get_flow(kv: &dyn KvRead, flow: &FlowId) -> Result<Option<FlowRecord>, KvError> {
    txn::get(kv, &keys::flow(flow))
}

/// One effect of `flow`.
pub fn get_effect(kv: &dyn KvRead, flow: &FlowId, effect_id: &str) -> Result<Option<EffectRecord>, KvError> {
    txn::get(kv, &keys::effect(flow, effect_id))
}

/// Every effect of `flow`, by effect id (byte order).
pub fn list_effects(kv: &dyn KvRead, flow: &FlowId) -> Result<Vec<(String, EffectRecord)>, KvError> {
    rows_by_name(kv, &keys::effects_prefix(flow), "bad effect key")
}

/// Every row under `prefix` whose key continues with a UTF-8 name, decoded, by name.
fn rows_by_name<T: serde::de::DeserializeOwned>(
    kv: &dyn KvRead,
    prefix: &[u8],
    bad_key: &str,
) -> Result<Vec<(String, T)>, KvError> {
    txn::scan_all(kv, prefix)?
        .into_iter()
        .map(|(key, value)| {
            let name =
                key.strip_prefix(prefix).and_then(keys::utf8).ok_or_else(|| txn::corrupt(&key, bad_key))?;
            Ok((name, txn::decode(&key, &value)?))
        })
        .collect()
}

/// Up to `limit` events of `flow`'s log from sequence number `from_seq` on, with their numbers.
pub fn events(
    kv: &dyn KvRead,
    flow: &FlowId,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<(u64, Event)>, KvError> {
    let prefix = keys::events_prefix(flow);
    kv.scan(&prefix, Some(&keys::event(flow, from_seq)), limit)?
        .into_iter()
        .map(|(key, value)| {
            let seq = key
                .strip_prefix(prefix.as_slice())
                .and_then(keys::take_u64)
                .filter(|(_, rest)| rest.is_empty())
                .map(|(seq, _)| seq)
                .ok_or_else(|| txn::corrupt(&key, "bad event key"))?;
            Ok((seq, txn::decode(&key, &value)?))
        })
        .collect()
}

/// The note on `flow` ([`super::ShardCommand::Note`]): why it makes no progress, if known.
pub fn note_of(kv: &dyn KvRead, flow: &FlowId) -> Result<Option<String>, KvError> {
    txn::get(kv, &keys::note(flow))
}

/// The armed timers of `flow`: (timer id, deadline ms), by timer id.
pub fn timers_of(kv: &dyn KvRead, flow: &FlowId) -> Result<Vec<(String, u64)>, KvError> {
    rows_by_name(kv, &keys::flow_timers_prefix(flow), "bad timer key")
}

/// The earliest armed timers of the shard, in deadline order: up to `limit` of those with a
/// deadline at or before `upto_ms`, as (deadline, flow, timer id). `upto_ms = u64::MAX` gives the
/// earliest timers whatever their deadline.
pub fn due_timers(
    kv: &dyn KvRead,
    upto_ms: u64,
    limit: usize,
) -> Result<Vec<(u64, FlowId, String)>, KvError> {
    timers_after(kv, None, upto_ms, limit)
}

/// One page of the timer index: up to `limit` timers strictly after `after` (a (deadline, flow,
/// timer id) of a previous page; `None` starts at the earliest) with a deadline at or before
/// `upto_ms`, in deadline order. A page shorter than `limit` is the last one.
pub fn timers_after(
    kv: &dyn KvRead,
    after: Option<&(u64, FlowId, String)>,
    upto_ms: u64,
    limit: usize,
) -> Result<Vec<(u64, FlowId, String)>, KvError> {
    let start = after.map(|(deadline_ms, flow, timer_id)| {
        keys::successor(&keys::timer_index(*deadline_ms, flow, timer_id))
    });
    let mut out = Vec::new();
    for (key, _) in kv.scan(keys::TIMERS, start.as_deref(), limit)? {
        let (deadline, flow, timer_id) =
            keys::parse_timer_index(&key).ok_or_else(|| txn::corrupt(&key, "bad timer index key"))?;
        if deadline > upto_ms {
            break;
        }
        out.push((deadline, flow, timer_id));
    }
    Ok(out)
}

/// Up to `limit` unacknowledged outbox entries to `target`, in order, with their numbers.
pub fn outbox_pending(
    kv: &dyn KvRead,
    target: ShardId,
    limit: usize,
) -> Result<Vec<(u64, OutboxEntry)>, KvError> {
    kv.scan(&keys::outbox_prefix(target), None, limit)?
        .into_iter()
        .map(|(key, value)| {
            let (_, seq) = keys::parse_outbox(&key).ok_or_else(|| txn::corrupt(&key, "bad outbox key"))?;
            Ok((seq, txn::decode(&key, &value)?))
        })
        .collect()
}

/// Rows read at a time by [`outbox_pending_within`].
const OUTBOX_PAGE: usize = 16;

/// The unacknowledged outbox entries to `target`, in order, with their numbers: at most `limit`
/// of them and, past the first, no more than `max_bytes` of stored rows (a delivery carries them
/// in one command, which must stay small enough to replicate at once). The first entry is
/// returned whatever its size, so that delivery always makes progress. Rows are read a page at a
/// time, so memory stays near the budget however large the outbox is.
pub fn outbox_pending_within(
    kv: &dyn KvRead,
    target: ShardId,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<(u64, OutboxEntry)>, KvError> {
    let prefix = keys::outbox_prefix(target);
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut start: Option<Vec<u8>> = None;
    while out.len() < limit {
        let page = kv.scan(&prefix, start.as_deref(), OUTBOX_PAGE.min(limit - out.len()))?;
        let Some((last, _)) = page.last() else { break };
        // The smallest key after the last one read: where the next page starts.
        let mut next = last.clone();
        next.push(0);
        let full = page.len() == OUTBOX_PAGE.min(limit - out.len());
        for (key, value) in page {
            if !out.is_empty() && bytes + value.len() > max_bytes {
                return Ok(out);
            }
            bytes += value.len();
            let (_, seq) = keys::parse_outbox(&key).ok_or_else(|| txn::corrupt(&key, "bad outbox key"))?;
            out.push((seq, txn::decode(&key, &value)?));
        }
        if !full {
            break;
        }
        start = Some(next);
    }
    Ok(out)
}

/// The shards this shard's outbox has unacknowledged entries for, in order.
pub fn outbox_targets(kv: &dyn KvRead) -> Result<Vec<ShardId>, KvError> {
    let mut targets = Vec::new();
    let mut start = keys::OUTBOX.to_vec();
    // One probe per target: skip to the first key past the target's range.
    while let Some((key, _)) = kv.scan(keys::OUTBOX, Some(&start), 1)?.into_iter().next() {
        let (target, _) = keys::parse_outbox(&key).ok_or_else(|| txn::corrupt(&key, "bad outbox key"))?;
        targets.push(target);
        match target.0.checked_add(1) {
            Some(next) => start = keys::outbox_prefix(ShardId(next)),
            None => break,
        }
    }
    Ok(targets)
}

/// The highest outbox number applied from `source` (0 before any).
pub fn inbound_applied(kv: &dyn KvRead, source: ShardId) -> Result<u64, KvError> {
    Ok(txn::get(kv, &keys::inbound(source))?.unwrap_or(0))
}

/// The last outbox number this shard assigned to entries for `target` (0 before any).
pub fn outbox_last_seq(kv: &dyn KvRead, target: ShardId) -> Result<u64, KvError> {
    Ok(txn::get(kv, &keys::outbox_next(target))?.unwrap_or(0))
}

/// Up to `limit` flow records, optionally of one type, strictly after `after`.
///
/// The order is that of the stored keys: by type, then instance, each compared by length first
/// and then bytewise (so `o-9` comes before `o-10`). Pass the last id of a page as `after` to get
/// the next page.
pub fn list_flows(
    kv: &dyn KvRead,
    flow_type: Option<&str>,
    after: Option<&FlowId>,
    limit: usize,
) -> Result<Vec<FlowRecord>, KvError> {
    let prefix = keys::flows_prefix(flow_type);
    let start = after.map(|f| keys::successor(&keys::flow(f)));
    decode_all(kv.scan(&prefix, start.as_deref(), limit)?)
}

/// The flows that are `Running` (they need an activation), up to `limit`, in key order.
pub fn running_flows(kv: &dyn KvRead, limit: usize) -> Result<Vec<FlowId>, KvError> {
    running_flows_after(kv, None, limit)
}

/// One page of the running index: up to `limit` `Running` flows strictly after `after` (the last
/// flow of a previous page; `None` starts at the first), in key order. A page shorter than
/// `limit` is the last one.
pub fn running_flows_after(
    kv: &dyn KvRead,
    after: Option<&FlowId>,
    limit: usize,
) -> Result<Vec<FlowId>, KvError> {
    let start = after.map(|flow| keys::successor(&keys::running(flow)));
    kv.scan(keys::RUNNING, start.as_deref(), limit)?
        .into_iter()
        .map(|(key, _)| keys::parse_running(&key).ok_or_else(|| txn::corrupt(&key, "bad running key")))
        .collect()
}

/// Up to `limit` dead letters addressed to `flow`, in arrival order, after arrival number
/// `after_seq` (`None` starts at the first).
pub fn dead_letters_of(
    kv: &dyn KvRead,
    flow: &FlowId,
    after_seq: Option<u64>,
    limit: usize,
) -> Result<Vec<DeadLetter>, KvError> {
    let start = after_seq.map(|seq| keys::successor(&keys::dead_letter(flow, seq)));
    decode_all(kv.scan(&keys::dead_letters_prefix(flow), start.as_deref(), limit)?)
}

/// One page of the shard's dead letters: up to `limit` strictly after `after` (the target and
/// arrival number of a previous page's last letter; `None` starts at the first), ordered by
/// target (in the order of [`list_flows`]) and then by arrival.
pub fn dead_letters_after(
    kv: &dyn KvRead,
    after: Option<(&FlowId, u64)>,
    limit: usize,
) -> Result<Vec<DeadLetter>, KvError> {
    let start = after.map(|(flow, seq)| keys::successor(&keys::dead_letter(flow, seq)));
    decode_all(kv.scan(keys::DEAD_LETTERS, start.as_deref(), limit)?)
}

/// The shard's dead-letter totals (kept, bytes, dropped).
pub fn dead_letter_stats(kv: &dyn KvRead) -> Result<DeadLetterStats, KvError> {
    Ok(txn::get(kv, keys::DEAD_LETTER_STATS)?.unwrap_or_default())
}
