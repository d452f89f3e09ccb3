//! Flows talking to flows: messages to other flows and child flows, exactly once through the
//! shard outbox (the send or start is recorded as an effect in the same transaction as its
//! outbox entry; the leader delivers outbox entries in order and the target applies each once).

use fetter_raft::ids::FlowId;
use fetter_raft::shard::{EffectKind, EffectRecord, EffectState, Event, ShardCommand};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::wait::Message;
use super::Ctx;
use crate::flow::{kind, FlowError};

impl Ctx {
    /// Sends `message` to `target`'s event log, exactly once (recorded under `id`). It returns
    /// once the send is committed here; delivery follows through the outbox. A target that does
    /// not exist or has finished when the message arrives does not take it: the message is kept
    /// as a dead letter on the target's shard (`flow get`, `flow dead-letters`). After an operator
    /// removes this effect (or restarts the flow without its effects), the send runs again and
    /// is a new message at the target.
    pub async fn send<M: Message>(
        &self,
        id: impl Into<String>,
        target: &FlowId,
        message: &M,
    ) -> Result<(), FlowError> {
        let id = id.into();
        if self.recorded_as(&id, EffectKind::Send).await {
            return Ok(());
        }
        let payload = serde_json::to_vec(message).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
        let payload = self.bounded(|| format!("the message of send {id:?}"), payload).await;
        self.commit(ShardCommand::Send {
            flow: self.inner.flow.clone(),
            epoch: self.inner.epoch,
            effect_id: id.clone(),
            target: target.clone(),
            type_name: M::NAME.into(),
            payload,
        })
        .await;
        self.remember(
            &id,
            Some(EffectRecord {
                kind: EffectKind::Send,
                type_name: M::NAME.into(),
                state: EffectState::Completed(b"null".to_vec()),
            }),
        );
        Ok(())
    }

    /// Starts the child flow `child` with `input`, exactly once (recorded under `id`); its result
    /// arrives in this flow's log ([`Ctx::child_result`]). The child may live on another shard.
    pub async fn start_child<I: Serialize>(
        &self,
        id: impl Into<String>,
        child: &FlowId,
        input: &I,
    ) -> Result<(), FlowError> {
        let id = id.into();
        if self.recorded_as(&id, EffectKind::Child).await {
            return Ok(());
        }
        let input = serde_json::to_vec(input).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
        let input = self.bounded(|| format!("the input of child {id:?}"), input).await;
        self.commit(ShardCommand::StartChild {
            flow: self.inner.flow.clone(),
            epoch: self.inner.epoch,
            effect_id: id.clone(),
            child: child.clone(),
            input,
        })
        .await;
        let value = serde_json::to_vec(child).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
        self.remember(
            &id,
            Some(EffectRecord {
                kind: EffectKind::Child,
                type_name: child.flow_type.clone(),
                state: EffectState::Completed(value),
            }),
        );
        Ok(())
    }

    /// Starts several children (`(effect id, child, input)` each): the fan-out of a fan-out /
    /// fan-in. Await each with [`Ctx::child_result`].
    pub async fn start_children<I: Serialize>(
        &self,
        children: impl IntoIterator<Item = (String, FlowId, I)>,
    ) -> Result<(), FlowError> {
        for (id, child, input) in children {
            self.start_child(id, &child, &input).await?;
        }
        Ok(())
    }

    /// The result of the child flow `child`: its output, or its error.
    pub async fn child_result<O: DeserializeOwned>(&self, child: &FlowId) -> Result<O, FlowError> {
        let result = self
            .wait_for(
                |event| match event {
                    Event::ChildResult { child: c, result } if c == child => Some(result.clone()),
                    _ => None,
                },
                None,
            )
            .await?;
        match result {
            super::wait::Woken::Message(Ok(output)) => serde_json::from_slice(&output)
                .map_err(|e| FlowError::new(kind::REPLAY_DRIFT, format!("output of child {child}: {e}"))),
            super::wait::Woken::Message(Err(error)) => Err(FlowError::from_info(error)),
            super::wait::Woken::Timer => Err(FlowError::new(kind::ERROR, "a child wait woke by a timer")),
        }
    }

    /// Whether `id` is recorded (as `kind`; another kind is replay drift).
    async fn recorded_as(&self, id: &str, kind: EffectKind) -> bool {
        match self.recorded(id) {
            None => false,
            Some(record) => match Ctx::check_kind(&record, kind) {
                Ok(()) => true,
                Err(d) => self.drift(id, d).await,
            },
        }
    }
}
