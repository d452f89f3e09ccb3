//! Stored records to the public API's messages, and the API's names for statuses and kinds.

use fetter_actors::control::FlowView;
use fetter_raft::ids::{FlowId, NodeId};
use fetter_raft::shard::{
    DeadLetter, DeadLetterReason, EffectKind, EffectState, Event, FlowRecord, FlowStatus,
};

use crate::proto;

/// The API's name of a status.
pub(crate) fn status_name(status: &FlowStatus) -> &'static str {
    match status {
        FlowStatus::Running => "running",
        FlowStatus::Suspended => "suspended",
        FlowStatus::Postponed { .. } => "postponed",
        FlowStatus::Succeeded => "succeeded",
        FlowStatus::Failed => "failed",
        FlowStatus::Cancelled => "cancelled",
    }
}

/// The status a name stands for (`postponed` matches any deadline), or `None`.
pub(crate) fn status_from_name(name: &str) -> Option<FlowStatus> {
    Some(match name {
        "running" => FlowStatus::Running,
        "suspended" => FlowStatus::Suspended,
        "postponed" => FlowStatus::Postponed { until_ms: 0 },
        "succeeded" => FlowStatus::Succeeded,
        "failed" => FlowStatus::Failed,
        "cancelled" => FlowStatus::Cancelled,
        _ => return None,
    })
}

fn kind_name(kind: EffectKind) -> &'static str {
    match kind {
        EffectKind::Effect => "effect",
        EffectKind::State => "state",
        EffectKind::Uuid => "uuid",
        EffectKind::Now => "now",
        EffectKind::Random => "random",
        EffectKind::Sleep => "timer",
        EffectKind::Child => "child",
        EffectKind::Send => "send",
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn flow_ref(flow: &FlowId) -> proto::FlowRef {
    proto::FlowRef { flow_type: flow.flow_type.clone(), instance: flow.instance.clone() }
}

/// One flow as the API shows it.
pub(crate) fn flow(view: &FlowView, leader: Option<NodeId>) -> proto::Flow {
    let r = &view.record;
    let effects = view
        .effects
        .iter()
        .map(|(id, e)| {
            let (state, value_json) = match &e.state {
                EffectState::Started => ("started", String::new()),
                EffectState::Completed(v) => ("completed", text(v)),
                EffectState::Failed(err) => {
                    ("failed", serde_json::json!({"kind": err.kind, "message": err.message}).to_string())
                }
                EffectState::AttemptFailed { attempt, error, retry_at_ms } => {
                    let value = serde_json::json!({
                        "kind": error.kind,
                        "message": error.message,
                        "attempt": attempt,
                        "retry_at_ms": retry_at_ms,
                    });
                    ("retrying", value.to_string())
                }
            };
            proto::Effect { id: id.clone(), kind: kind_name(e.kind).into(), state: state.into(), value_json }
        })
        .collect();
    let events = view
        .events
        .iter()
        .map(|(seq, e)| match e {
            Event::Message { type_name, payload, .. } => proto::Event {
                seq: *seq,
                kind: "message".into(),
                name: type_name.clone(),
                payload_json: text(payload),
            },
            Event::TimerFired { timer_id } => proto::Event {
                seq: *seq,
                kind: "timer_fired".into(),
                name: timer_id.clone(),
                payload_json: String::new(),
            },
            Event::ChildResult { child, result } => proto::Event {
                seq: *seq,
                kind: "child_finished".into(),
                name: child.to_string(),
                payload_json: match result {
                    Ok(v) => text(v),
                    Err(err) => serde_json::json!({"kind": err.kind, "message": err.message}).to_string(),
                },
            },
        })
        .collect();
    let timers =
        view.timers.iter().map(|(id, at)| proto::Timer { id: id.clone(), deadline_ms: *at }).collect();
    proto::Flow {
        flow_type: r.id.flow_type.clone(),
        instance: r.id.instance.clone(),
        status: status_name(&r.status).into(),
        error_kind: r.error.as_ref().map(|e| e.kind.clone()),
        error: r.error.as_ref().map(|e| e.message.clone()),
        epoch: r.epoch.0,
        input_json: text(&r.input),
        output_json: r.output.as_deref().map(text),
        effects,
        events,
        timers,
        leader_node: leader.map(|n| n.0),
        parent: r.parent.as_ref().map(flow_ref),
        created_ms: r.created_ms,
        finished_ms: r.finished_ms,
        postponed_until_ms: match r.status {
            FlowStatus::Postponed { until_ms } => Some(until_ms),
            _ => None,
        },
        note: view.note.clone(),
        dead_letters: view.dead_letters.iter().map(dead_letter).collect(),
    }
}

/// One dead letter as the API shows it.
pub(crate) fn dead_letter(letter: &DeadLetter) -> proto::DeadLetter {
    let (reason, target_status) = match &letter.reason {
        DeadLetterReason::NotFound => ("not_found", None),
        DeadLetterReason::Finished { status } => ("finished", Some(status_name(status).to_string())),
    };
    proto::DeadLetter {
        target: Some(flow_ref(&letter.target)),
        seq: letter.seq,
        sender: letter.sender.as_ref().map(flow_ref),
        message_type: letter.type_name.clone(),
        payload_json: text(&letter.payload),
        idempotency_key: letter.idempotency_key.clone(),
        reason: reason.into(),
        target_status,
        at_ms: letter.at_ms,
    }
}

/// A dead-letter listing cursor: the target and arrival number of a page's last letter.
pub(crate) fn letter_cursor(letter: &DeadLetter) -> String {
    serde_json::json!([letter.target.flow_type, letter.target.instance, letter.seq]).to_string()
}

/// The (target, arrival number) a dead-letter cursor names, or `None` if it is not one of ours.
pub(crate) fn from_letter_cursor(cursor: &str) -> Option<(FlowId, u64)> {
    let (flow_type, instance, seq): (String, String, u64) = serde_json::from_str(cursor).ok()?;
    Some((FlowId::new(flow_type, instance), seq))
}

/// One line of a listing.
pub(crate) fn summary(r: &FlowRecord) -> proto::FlowSummary {
    proto::FlowSummary {
        flow_type: r.id.flow_type.clone(),
        instance: r.id.instance.clone(),
        status: status_name(&r.status).into(),
        error_kind: r.error.as_ref().map(|e| e.kind.clone()),
        epoch: r.epoch.0,
        created_ms: r.created_ms,
        finished_ms: r.finished_ms,
    }
}

/// A listing cursor: the last flow of a page, opaque to clients.
pub(crate) fn cursor(flow: &FlowId) -> String {
    serde_json::json!([flow.flow_type, flow.instance]).to_string()
}

/// The flow a cursor names, or `None` if it is not one of ours.
pub(crate) fn from_cursor(cursor: &str) -> Option<FlowId> {
    let (flow_type, instance): (String, String) = serde_json::from_str(cursor).ok()?;
    Some(FlowId::new(flow_type, instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in [
            FlowStatus::Running,
            FlowStatus::Suspended,
            FlowStatus::Postponed { until_ms: 0 },
            FlowStatus::Succeeded,
            FlowStatus::Failed,
            FlowStatus::Cancelled,
        ] {
            assert_eq!(status_from_name(status_name(&s)), Some(s));
        }
        assert_eq!(status_from_name("sleeping"), None);
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let flow = FlowId::new("order", "o-1/with\"odd");
        assert_eq!(from_cursor(&cursor(&flow)), Some(flow.clone()));
        assert_eq!(from_cursor("not a cursor"), None);
        let letter = DeadLetter {
            seq: 7,
            target: flow.clone(),
            sender: None,
            type_name: "Go".into(),
            payload: b"1".to_vec(),
            idempotency_key: None,
            reason: DeadLetterReason::NotFound,
            at_ms: 1,
        };
        assert_eq!(from_letter_cursor(&letter_cursor(&letter)), Some((flow, 7)));
        assert_eq!(from_letter_cursor(&cursor(&letter.target)), None);
    }
}
