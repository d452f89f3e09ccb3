//! Waiting: messages, timers and sleeps, each an event of the flow's log (DESIGN.md §1.5).
//!
//! A wait takes the earliest event of the log that matches it and that no earlier wait of this
//! run took; events it skips stay for later waits (a selective receive). A timeout is the
//! committed `TimerFired` event, never a clock reading, so a replay sees the same events in the
//! same order and takes the same ones. When nothing matches, the activation commits
//! `Suspend{events_seen}`: the shard suspends the flow only if no event arrived since, and
//! otherwise answers `Resume` and the wait looks again.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fetter_raft::shard::{self, EffectKind, EffectRecord, EffectState, Event, ShardCommand, ShardOutcome};
use serde::de::DeserializeOwned;
use serde::Serialize;

use fetter_raft::sync::{lock, now_ms};

use super::{Ctx, Halt};
use crate::flow::{kind, FlowError};

/// A message a flow can wait for. `NAME` is its stable wire name (never `std::any::type_name`,
/// which may change between compiler versions).
pub trait Message: Serialize + DeserializeOwned + Send {
    /// The stable name senders use for this message type.
    const NAME: &'static str;
}

/// The flow's event log as this activation has seen it, and which events its waits took.
pub(crate) struct EventView {
    events: Vec<(u64, Event)>,
    taken: BTreeSet<u64>,
    /// The log length seen: the next event's sequence number.
    seen: u64,
}

impl EventView {
    pub(crate) fn new(events: Vec<(u64, Event)>) -> EventView {
        let seen = events.last().map_or(0, |(seq, _)| seq + 1);
        EventView { events, taken: BTreeSet::new(), seen }
    }

    /// The earliest untaken event `pick` accepts; `pick` returns what the wait yields.
    fn take<R>(&mut self, mut pick: impl FnMut(&Event) -> Option<R>) -> Option<R> {
        for (seq, event) in &self.events {
            if self.taken.contains(seq) {
                continue;
            }
            if let Some(r) = pick(event) {
                self.taken.insert(*seq);
                return Some(r);
            }
        }
        None
    }
}

/// What a wait yields.
pub(super) enum Woken<T> {
    Message(T),
    Timer,
}

impl Ctx {
    /// The next message of type `T` (the earliest one not yet taken).
    pub async fn message<T: Message>(&self) -> Result<T, FlowError> {
        self.message_matching(|_: &T| true).await
    }

    /// The next message of type `T` for which `pred` holds; other messages stay in the log.
    pub async fn message_matching<T: Message>(&self, pred: impl Fn(&T) -> bool) -> Result<T, FlowError> {
        match self.wait_for(|e| decode_message(e, &pred), None).await? {
            Woken::Message(m) => Ok(m),
            Woken::Timer => Err(FlowError::new(kind::ERROR, "a wait without timer woke by a timer")),
        }
    }

    /// The next message of type `T`, or `None` if the timer `timer_id` (armed now for `timeout`,
    /// or as recorded on replay) fires first.
    pub async fn message_within<T: Message>(
        &self,
        timer_id: impl Into<String>,
        timeout: Duration,
    ) -> Result<Option<T>, FlowError> {
        let timer_id = timer_id.into();
        self.arm(&timer_id, now_ms().saturating_add(timeout.as_millis() as u64)).await?;
        match self.wait_for(|e| decode_message(e, &|_: &T| true), Some(&timer_id)).await? {
            Woken::Message(m) => Ok(Some(m)),
            Woken::Timer => Ok(None),
        }
    }

    /// Up to `n` messages of type `T` that arrive before the timer `timer_id` (armed now for
    /// `window`, or as recorded) fires: what arrived, in log order.
    pub async fn messages<T: Message>(
        &self,
        n: usize,
        timer_id: impl Into<String>,
        window: Duration,
    ) -> Result<Vec<T>, FlowError> {
        let timer_id = timer_id.into();
        self.arm(&timer_id, now_ms().saturating_add(window.as_millis() as u64)).await?;
        let mut got = Vec::new();
        while got.len() < n {
            match self.wait_for(|e| decode_message(e, &|_: &T| true), Some(&timer_id)).await? {
                Woken::Message(m) => got.push(m),
                Woken::Timer => break,
            }
        }
        Ok(got)
    }

    /// Sleeps durably for `duration` (from the first run; a replay keeps the recorded deadline).
    pub async fn sleep(&self, id: impl Into<String>, duration: Duration) -> Result<(), FlowError> {
        let id = id.into();
        self.arm(&id, now_ms().saturating_add(duration.as_millis() as u64)).await?;
        self.wait_for(|_| None::<()>, Some(&id)).await.map(|_| ())
    }

    /// Sleeps durably until `until`.
    pub async fn sleep_until(&self, id: impl Into<String>, until: SystemTime) -> Result<(), FlowError> {
        let id = id.into();
        let ms = until.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.arm(&id, ms).await?;
        self.wait_for(|_| None::<()>, Some(&id)).await.map(|_| ())
    }

    /// Postpones the whole flow for `duration` (from the first run): it ends this activation with
    /// status `Postponed` and runs again from the top once the time has come; a replay then
    /// passes this point. Recorded under `id`.
    pub async fn postpone(&self, id: impl Into<String>, duration: Duration) -> Result<(), FlowError> {
        self.postpone_to(id.into(), now_ms().saturating_add(duration.as_millis() as u64)).await
    }

    /// Postpones the whole flow until `until` (see [`Ctx::postpone`]).
    pub async fn postpone_until(&self, id: impl Into<String>, until: SystemTime) -> Result<(), FlowError> {
        let ms = until.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.postpone_to(id.into(), ms).await
    }

    async fn postpone_to(&self, id: String, until_ms: u64) -> Result<(), FlowError> {
        // The deadline is recorded first, so every replay postpones to the same moment.
        let deadline: u64 = match self.recorded(&id) {
            Some(record) => {
                if let Err(d) = Ctx::check_kind(&record, EffectKind::Sleep) {
                    return self.drift(&id, d).await;
                }
                match &record.state {
                    EffectState::Completed(v) => self.decode(&id, v).await,
                    other => return self.drift(&id, format!("recorded in state {other:?}")).await,
                }
            }
            None => {
                let value =
                    serde_json::to_vec(&until_ms).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
                self.commit(ShardCommand::EffectCompleted {
                    flow: self.inner.flow.clone(),
                    epoch: self.inner.epoch,
                    effect_id: id.clone(),
                    kind: EffectKind::Sleep,
                    type_name: shard::SLEEP_TYPE_NAME.into(),
                    value: value.clone(),
                })
                .await;
                self.remember(
                    &id,
                    Some(EffectRecord {
                        kind: EffectKind::Sleep,
                        type_name: shard::SLEEP_TYPE_NAME.into(),
                        state: EffectState::Completed(value),
                    }),
                );
                until_ms
            }
        };
        if now_ms() >= deadline {
            return Ok(());
        }
        let postpone = ShardCommand::Postpone {
            flow: self.inner.flow.clone(),
            epoch: self.inner.epoch,
            until_ms: deadline,
        };
        self.commit(postpone).await;
        self.halt(Halt::Suspended).await
    }

    /// Arms timer `id` for `deadline_ms` unless this flow already recorded it (then the recorded
    /// deadline stands).
    async fn arm(&self, id: &str, deadline_ms: u64) -> Result<(), FlowError> {
        if let Some(record) = self.recorded(id) {
            return match Ctx::check_kind(&record, EffectKind::Sleep) {
                Ok(()) => Ok(()),
                Err(d) => self.drift(id, d).await,
            };
        }
        let deadline_ms = if crate::bugs::planted("timer-early") {
            let now = now_ms();
            now + deadline_ms.saturating_sub(now) / 4
        } else if crate::bugs::planted("timer-late") {
            deadline_ms + crate::bugs::TIMER_LATE_MS
        } else {
            deadline_ms
        };
        let command = ShardCommand::ArmTimer {
            flow: self.inner.flow.clone(),
            epoch: self.inner.epoch,
            timer_id: id.to_string(),
            deadline_ms,
        };
        self.commit(command).await;
        let value =
            serde_json::to_vec(&deadline_ms).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
        self.remember(
            id,
            Some(EffectRecord {
                kind: EffectKind::Sleep,
                type_name: shard::SLEEP_TYPE_NAME.into(),
                state: EffectState::Completed(value),
            }),
        );
        Ok(())
    }

    /// Takes the earliest untaken event that `pick` accepts or that is `timer`'s firing; fetches
    /// newer events, and suspends the flow when there are none.
    pub(super) async fn wait_for<T>(
        &self,
        pick: impl Fn(&Event) -> Option<T>,
        timer: Option<&str>,
    ) -> Result<Woken<T>, FlowError> {
        let pick_any = |event: &Event| match event {
            Event::TimerFired { timer_id } if Some(timer_id.as_str()) == timer => Some(Woken::Timer),
            other => pick(other).map(Woken::Message),
        };
        loop {
            let seen = {
                let mut view = lock(&self.inner.events);
                if let Some(woken) = view.take(pick_any) {
                    return Ok(woken);
                }
                view.seen
            };
            // Events appended since this activation read the log.
            let flow = self.inner.flow.clone();
            let newer = self.inner.group.read_local(|kv| shard::events(kv, &flow, seen, usize::MAX));
            match newer {
                Ok(newer) if !newer.is_empty() => {
                    let mut view = lock(&self.inner.events);
                    view.seen = newer.last().map_or(view.seen, |(seq, _)| seq + 1);
                    view.events.extend(newer);
                    continue;
                }
                Ok(_) => {}
                Err(e) => return self.halt(Halt::Fenced(format!("cannot read the event log: {e}"))).await,
            }
            #[cfg(feature = "test-hooks")]
            crate::hooks::before_suspend(&self.inner.flow).await;
            let suspend = ShardCommand::Suspend {
                flow: self.inner.flow.clone(),
                epoch: self.inner.epoch,
                events_seen: seen,
            };
            match self.commit(suspend).await {
                // An event arrived between the read and the suspend: look again.
                ShardOutcome::Resume { .. } => continue,
                _ => return self.halt(Halt::Suspended).await,
            }
        }
    }
}

/// The message in `event` if it is a `T` (by name) that decodes and satisfies `pred`. A message
/// of the right name that does not decode is left in the log (and logged), not taken.
fn decode_message<T: Message>(event: &Event, pred: &impl Fn(&T) -> bool) -> Option<T> {
    match event {
        Event::Message { type_name, payload, .. } if type_name == T::NAME => {
            match serde_json::from_slice::<T>(payload) {
                Ok(m) if pred(&m) => Some(m),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(message = T::NAME, error = %e, "message does not decode; left in the log");
                    None
                }
            }
        }
        _ => None,
    }
}
