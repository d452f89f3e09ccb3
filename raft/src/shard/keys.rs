//! The row layout of a shard's state. Private to the shard module: readers use [`super::read`].
//!
//! Every key starts with a printable ASCII tag byte (keys starting with `0x00` are reserved by
//! the storage layer for `last_applied` and membership). Multi-byte numbers are big-endian so
//! that byte order is numeric order. A flow is encoded as `u32-BE len ‖ type ‖ u32-BE len ‖
//! instance` (its "flow part"), which is prefix-free: no flow's part is a prefix of another's,
//! so all rows of one flow can be scanned and deleted by prefix.
//!
//! | key | value |
//! |---|---|
//! | `C` | shard clock (`u64`) |
//! | `S` | `u64`: the last run seed given out ([`super::FlowRecord::seed`]) |
//! | `G` | shard configuration ([`super::read::ShardConfig`]) |
//! | `F` flow | [`super::FlowRecord`] |
//! | `A` flow | marker: the flow is `Running` (what a new leader activates) |
//! | `f` flow `e` effect-id | [`super::EffectRecord`] |
//! | `f` flow `v` seq | [`super::Event`] |
//! | `f` flow `k` idempotency-key | `u64` seq of the stored message |
//! | `f` flow `t` timer-id | `u64` deadline |
//! | `f` flow `c` child-flow | marker: a child started by this flow |
//! | `f` flow `n` | `String`: why the running flow makes no progress (a note for operators) |
//! | `T` deadline flow timer-id | marker: the timer index |
//! | `O` target seq | [`super::OutboxEntry`] |
//! | `N` target | `u64`: the last outbox number assigned to `target` |
//! | `I` source | `u64`: the highest outbox number applied from `source` |
//! | `R` finished-ms flow | marker: the retention index |
//! | `Q` request-id | `RequestRecord`: a control-panel request's fingerprint, time and reply |
//! | `q` at-ms request-id | marker: request ids by age (collection, the bound) |
//! | `P` | `u64`: how many request ids are stored |
//! | `D` | [`super::DeadLetterStats`] of the shard's dead letters |
//! | `L` flow seq | [`super::DeadLetter`]: a message its target could not take, by target |
//! | `M` seq flow | `u64` arrival time (ms): the dead letters in arrival order (eviction, GC) |

use crate::ids::{FlowId, ShardId};

/// The shard clock.
pub(super) const CLOCK: &[u8] = b"C";
/// The last run seed given out.
pub(super) const SEEDS: &[u8] = b"S";
/// The shard configuration.
pub(super) const CONFIG: &[u8] = b"G";
/// Prefix of flow records.
pub(super) const FLOWS: &[u8] = b"F";
/// Prefix of the running-flow index.
pub(super) const RUNNING: &[u8] = b"A";
/// Prefix of flow-scoped rows.
const SCOPE: u8 = b'f';
/// Prefix of the timer index.
pub(super) const TIMERS: &[u8] = b"T";
/// Prefix of outbox rows.
pub(super) const OUTBOX: &[u8] = b"O";
/// Prefix of per-target outbox counters.
const OUTBOX_NEXT: u8 = b'N';
/// Prefix of per-source inbound counters.
const INBOUND: u8 = b'I';
/// Prefix of the retention index.
pub(super) const RETENTION: &[u8] = b"R";
/// Prefix of stored request ids.
const REQUESTS: &[u8] = b"Q";
/// Prefix of request ids by age.
pub(super) const REQUESTS_BY_AGE: &[u8] = b"q";
/// How many request ids are stored.
pub(super) const REQUEST_COUNT: &[u8] = b"P";
/// The dead-letter statistics.
pub(super) const DEAD_LETTER_STATS: &[u8] = b"D";
/// Prefix of the dead letters by target.
pub(super) const DEAD_LETTERS: &[u8] = b"L";
/// Prefix of the dead letters in arrival order.
pub(super) const DEAD_LETTER_QUEUE: &[u8] = b"M";

const EFFECT: u8 = b'e';
const EVENT: u8 = b'v';
const IDEM: u8 = b'k';
const TIMER: u8 = b't';
const CHILD: u8 = b'c';
const NOTE: u8 = b'n';

/// A length that fits the u32 prefix. Strings longer than 4 GiB cannot reach `apply` (payload
/// limits are far lower), so saturating is only a guard against a panic.
fn len32(s: &str) -> [u8; 4] {
    u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes()
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&len32(s));
    out.extend_from_slice(s.as_bytes());
}

fn push_flow(out: &mut Vec<u8>, flow: &FlowId) {
    push_str(out, &flow.flow_type);
    push_str(out, &flow.instance);
}

fn tagged(tag: &[u8], capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(tag.len() + capacity);
    out.extend_from_slice(tag);
    out
}

fn flow_len(flow: &FlowId) -> usize {
    8 + flow.flow_type.len() + flow.instance.len()
}

/// Splits a length-prefixed string off the front of `bytes`.
fn take_str(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (s, rest) = rest.split_at(len);
    Some((String::from_utf8(s.to_vec()).ok()?, rest))
}

/// Splits a flow part off the front of `bytes`.
pub(super) fn take_flow(bytes: &[u8]) -> Option<(FlowId, &[u8])> {
    let (flow_type, rest) = take_str(bytes)?;
    let (instance, rest) = take_str(rest)?;
    Some((FlowId { flow_type, instance }, rest))
}

/// Splits a big-endian u64 off the front of `bytes`.
pub(super) fn take_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (n, rest) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*n), rest))
}

/// Splits a big-endian u32 off the front of `bytes`.
fn take_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (n, rest) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*n), rest))
}

/// `bytes` as a UTF-8 string.
pub(super) fn utf8(bytes: &[u8]) -> Option<String> {
    String::from_utf8(bytes.to_vec()).ok()
}

/// The smallest key greater than `key` (for "strictly after" scans).
pub(super) fn successor(key: &[u8]) -> Vec<u8> {
    let mut out = key.to_vec();
    out.push(0);
    out
}

// --- flow records ---

/// `F` flow: the flow record.
pub(super) fn flow(flow: &FlowId) -> Vec<u8> {
    let mut key = tagged(FLOWS, flow_len(flow));
    push_flow(&mut key, flow);
    key
}

/// The prefix of flow records, optionally of one flow type.
pub(super) fn flows_prefix(flow_type: Option<&str>) -> Vec<u8> {
    let mut key = tagged(FLOWS, 4 + flow_type.map_or(0, str::len));
    if let Some(t) = flow_type {
        push_str(&mut key, t);
    }
    key
}

/// `A` flow: the flow is running.
pub(super) fn running(flow: &FlowId) -> Vec<u8> {
    let mut key = tagged(RUNNING, flow_len(flow));
    push_flow(&mut key, flow);
    key
}

/// Parses a running-index key.
pub(super) fn parse_running(key: &[u8]) -> Option<FlowId> {
    parse_flow_tagged(RUNNING, key)
}

fn parse_flow_tagged(tag: &[u8], key: &[u8]) -> Option<FlowId> {
    let (flow, rest) = take_flow(key.strip_prefix(tag)?)?;
    rest.is_empty().then_some(flow)
}

// --- flow-scoped rows ---

/// `f` flow: every flow-scoped row of `flow`.
pub(super) fn scope(flow: &FlowId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + flow_len(flow));
    key.push(SCOPE);
    push_flow(&mut key, flow);
    key
}

fn scoped(flow: &FlowId, sub: u8, tail: &[u8]) -> Vec<u8> {
    let mut key = scope(flow);
    key.reserve(1 + tail.len());
    key.push(sub);
    key.extend_from_slice(tail);
    key
}

/// The prefix of `flow`'s effects.
pub(super) fn effects_prefix(flow: &FlowId) -> Vec<u8> {
    scoped(flow, EFFECT, &[])
}

/// One effect of `flow`.
pub(super) fn effect(flow: &FlowId, effect_id: &str) -> Vec<u8> {
    scoped(flow, EFFECT, effect_id.as_bytes())
}

/// The prefix of `flow`'s event log.
pub(super) fn events_prefix(flow: &FlowId) -> Vec<u8> {
    scoped(flow, EVENT, &[])
}

/// One event of `flow`.
pub(super) fn event(flow: &FlowId, seq: u64) -> Vec<u8> {
    scoped(flow, EVENT, &seq.to_be_bytes())
}

/// The prefix of `flow`'s idempotency keys.
pub(super) fn idem_prefix(flow: &FlowId) -> Vec<u8> {
    scoped(flow, IDEM, &[])
}

/// One idempotency key of `flow`.
pub(super) fn idem(flow: &FlowId, idempotency_key: &str) -> Vec<u8> {
    scoped(flow, IDEM, idempotency_key.as_bytes())
}

/// The note on `flow`.
pub(super) fn note(flow: &FlowId) -> Vec<u8> {
    scoped(flow, NOTE, &[])
}

/// The prefix of `flow`'s timers.
pub(super) fn flow_timers_prefix(flow: &FlowId) -> Vec<u8> {
    scoped(flow, TIMER, &[])
}

/// One timer of `flow` (its deadline).
pub(super) fn flow_timer(flow: &FlowId, timer_id: &str) -> Vec<u8> {
    scoped(flow, TIMER, timer_id.as_bytes())
}

/// The prefix of the children of `parent`.
pub(super) fn children_prefix(parent: &FlowId) -> Vec<u8> {
    scoped(parent, CHILD, &[])
}

/// One child of `parent`.
pub(super) fn child(parent: &FlowId, child: &FlowId) -> Vec<u8> {
    let mut key = children_prefix(parent);
    push_flow(&mut key, child);
    key
}

// --- shard-wide indexes ---

/// `T` deadline flow timer-id: the timer index.
pub(super) fn timer_index(deadline_ms: u64, flow: &FlowId, timer_id: &str) -> Vec<u8> {
    let mut key = tagged(TIMERS, 8 + flow_len(flow) + timer_id.len());
    key.extend_from_slice(&deadline_ms.to_be_bytes());
    push_flow(&mut key, flow);
    key.extend_from_slice(timer_id.as_bytes());
    key
}

/// Parses a timer-index key into (deadline, flow, timer id).
pub(super) fn parse_timer_index(key: &[u8]) -> Option<(u64, FlowId, String)> {
    let (deadline, rest) = take_u64(key.strip_prefix(TIMERS)?)?;
    let (flow, rest) = take_flow(rest)?;
    Some((deadline, flow, utf8(rest)?))
}

/// The prefix of the outbox to `target`.
pub(super) fn outbox_prefix(target: ShardId) -> Vec<u8> {
    let mut key = tagged(OUTBOX, 4);
    key.extend_from_slice(&target.0.to_be_bytes());
    key
}

/// One outbox entry to `target`.
pub(super) fn outbox(target: ShardId, seq: u64) -> Vec<u8> {
    let mut key = outbox_prefix(target);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Parses an outbox key into (target, seq).
pub(super) fn parse_outbox(key: &[u8]) -> Option<(ShardId, u64)> {
    let (target, rest) = take_u32(key.strip_prefix(OUTBOX)?)?;
    let (seq, rest) = take_u64(rest)?;
    rest.is_empty().then_some((ShardId(target), seq))
}

/// The last outbox number assigned to `target`.
pub(super) fn outbox_next(target: ShardId) -> Vec<u8> {
    let mut key = vec![OUTBOX_NEXT];
    key.extend_from_slice(&target.0.to_be_bytes());
    key
}

/// The highest outbox number applied from `source`.
pub(super) fn inbound(source: ShardId) -> Vec<u8> {
    let mut key = vec![INBOUND];
    key.extend_from_slice(&source.0.to_be_bytes());
    key
}

/// `R` finished-ms flow: the retention index.
pub(super) fn retention(finished_ms: u64, flow: &FlowId) -> Vec<u8> {
    let mut key = tagged(RETENTION, 8 + flow_len(flow));
    key.extend_from_slice(&finished_ms.to_be_bytes());
    push_flow(&mut key, flow);
    key
}

/// Parses a retention key into (finished-ms, flow).
pub(super) fn parse_retention(key: &[u8]) -> Option<(u64, FlowId)> {
    let (finished, rest) = take_u64(key.strip_prefix(RETENTION)?)?;
    let (flow, rest) = take_flow(rest)?;
    rest.is_empty().then_some((finished, flow))
}

/// `Q` request-id: a stored request id.
pub(super) fn request(request_id: &str) -> Vec<u8> {
    let mut key = tagged(REQUESTS, request_id.len());
    key.extend_from_slice(request_id.as_bytes());
    key
}

/// `q` at-ms request-id: the age index of request ids.
pub(super) fn request_by_age(at_ms: u64, request_id: &str) -> Vec<u8> {
    let mut key = tagged(REQUESTS_BY_AGE, 8 + request_id.len());
    key.extend_from_slice(&at_ms.to_be_bytes());
    key.extend_from_slice(request_id.as_bytes());
    key
}

/// Parses an age-index key into (at-ms, request id).
pub(super) fn parse_request_by_age(key: &[u8]) -> Option<(u64, String)> {
    let (at_ms, rest) = take_u64(key.strip_prefix(REQUESTS_BY_AGE)?)?;
    Some((at_ms, utf8(rest)?))
}

// --- dead letters ---

/// The dead letters addressed to `flow` (all of them, in arrival order).
pub(super) fn dead_letters_prefix(flow: &FlowId) -> Vec<u8> {
    let mut key = tagged(DEAD_LETTERS, flow_len(flow) + 8);
    push_flow(&mut key, flow);
    key
}

/// `L` flow seq: one dead letter, by target.
pub(super) fn dead_letter(flow: &FlowId, seq: u64) -> Vec<u8> {
    let mut key = dead_letters_prefix(flow);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Parses a dead-letter key into (target, seq).
pub(super) fn parse_dead_letter(key: &[u8]) -> Option<(FlowId, u64)> {
    let (flow, rest) = take_flow(key.strip_prefix(DEAD_LETTERS)?)?;
    let (seq, rest) = take_u64(rest)?;
    rest.is_empty().then_some((flow, seq))
}

/// `M` seq flow: a dead letter in arrival order.
pub(super) fn dead_letter_queue(seq: u64, flow: &FlowId) -> Vec<u8> {
    let mut key = tagged(DEAD_LETTER_QUEUE, 8 + flow_len(flow));
    key.extend_from_slice(&seq.to_be_bytes());
    push_flow(&mut key, flow);
    key
}

/// Parses an arrival-order key into (seq, target).
pub(super) fn parse_dead_letter_queue(key: &[u8]) -> Option<(u64, FlowId)> {
    let (seq, rest) = take_u64(key.strip_prefix(DEAD_LETTER_QUEUE)?)?;
    let (flow, rest) = take_flow(rest)?;
    rest.is_empty().then_some((seq, flow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_parts_are_prefix_free_and_parse_back() {
        let a = FlowId::new("ab", "c");
        let b = FlowId::new("a", "bc");
        let c = FlowId::new("ab", "cd");
        assert_ne!(scope(&a), scope(&b));
        assert!(!scope(&c).starts_with(&scope(&a)));
        assert_eq!(parse_flow_tagged(FLOWS, &flow(&a)), Some(a.clone()));
        assert_eq!(parse_running(&running(&b)), Some(b.clone()));
        assert_eq!(parse_timer_index(&timer_index(7, &c, "t-1")), Some((7, c.clone(), "t-1".into())));
        assert_eq!(parse_retention(&retention(9, &a)), Some((9, a.clone())));
        assert_eq!(parse_outbox(&outbox(ShardId(3), 11)), Some((ShardId(3), 11)));
        assert_eq!(parse_request_by_age(&request_by_age(5, "r-1")), Some((5, "r-1".into())));
        assert_eq!(parse_dead_letter(&dead_letter(&a, 4)), Some((a.clone(), 4)));
        assert_eq!(parse_dead_letter_queue(&dead_letter_queue(5, &c)), Some((5, c.clone())));
        assert!(dead_letter(&a, 1).starts_with(&dead_letters_prefix(&a)));
        assert!(!dead_letter(&c, 1).starts_with(&dead_letters_prefix(&a)));
        assert!(flow(&a).starts_with(&flows_prefix(Some("ab"))));
        assert!(!flow(&b).starts_with(&flows_prefix(Some("ab"))));
        assert_eq!(parse_flow_tagged(FLOWS, b"F\x00\x00\x00\x09ab"), None);
    }

    #[test]
    fn keys_start_printable_and_order_numerically() {
        let f = FlowId::new("t", "i");
        let keys = [
            CLOCK.to_vec(),
            CONFIG.to_vec(),
            flow(&f),
            running(&f),
            effect(&f, "e"),
            event(&f, 1),
            idem(&f, "k"),
            flow_timer(&f, "t"),
            child(&f, &f),
            timer_index(1, &f, "t"),
            outbox(ShardId(1), 1),
            outbox_next(ShardId(1)),
            inbound(ShardId(1)),
            retention(1, &f),
            request("r"),
            request_by_age(1, "r"),
            REQUEST_COUNT.to_vec(),
            DEAD_LETTER_STATS.to_vec(),
            dead_letter(&f, 1),
            dead_letter_queue(1, &f),
        ];
        for key in keys {
            assert!(key[0].is_ascii_graphic(), "{key:?}");
        }
        assert!(event(&f, 255) < event(&f, 256));
        assert!(timer_index(255, &f, "z") < timer_index(256, &f, "a"));
        assert!(outbox(ShardId(1), u64::MAX) < outbox(ShardId(2), 0));
    }
}
