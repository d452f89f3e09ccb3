//! [`Ctx`]: everything a flow may do to the world, each step journaled and replay-safe.
//!
//! An activation starts with the flow's recorded effects (read after its `Activate` committed).
//! A step whose id is recorded returns the recorded value without running anything; a new step
//! runs and is committed (with the activation's epoch) before the flow continues. When the
//! activation must end without returning into flow code — it was fenced by a newer epoch, a
//! proposal failed, or an at-most-once effect's outcome is unknown — the step never completes
//! and the driver drops the flow's future ([`crate::activation`]).

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{Epoch, FlowId};
use fetter_raft::shard::{
    EffectKind, EffectRecord, EffectState, ErrorInfo, Event, ShardCommand, ShardOutcome,
};
use fetter_raft::sync::{lock, now_ms};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

use crate::flow::{kind, FlowError};

mod flows;
mod wait;

pub use wait::Message;

/// Why an activation ends without returning into flow code.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Halt {
    /// Another activation owns the flow now, or the journal refused or could not take a step:
    /// stop quietly; whoever owns the flow replays it.
    Fenced(String),
    /// The flow must end `Failed` with this error (outcome unknown, replay drift).
    Fail(FlowError),
    /// The flow waits for an event not yet in its log and is suspended: the activation ends and
    /// the flow costs only disk until an event or a timer wakes it.
    Suspended,
}

/// The flow's handle on the world during one activation. Cheap to clone.
#[derive(Clone)]
pub struct Ctx {
    inner: Arc<Inner>,
}

struct Inner {
    flow: FlowId,
    epoch: Epoch,
    group: GroupHandle,
    effects: Mutex<HashMap<String, EffectRecord>>,
    events: Mutex<wait::EventView>,
    next_auto_id: AtomicU64,
    halt: watch::Sender<Option<Halt>>,
    /// Results of at-least-once effects not yet committed: they go into the log entry of the
    /// activation's next write, which always comes before the next effect's work runs, before
    /// the flow waits and with its end ([`Ctx::commit`], [`Ctx::flush`]).
    pending: Mutex<Vec<ShardCommand>>,
    /// The cluster's bound on one user payload (bytes): a larger value never enters the log.
    max_payload_bytes: u64,
    /// The run's seed (`FlowRecord::seed`), from which `uuid` and `random` derive their values.
    seed: u64,
}

impl Ctx {
    pub(crate) fn new(
        flow: FlowId,
        epoch: Epoch,
        group: GroupHandle,
        effects: Vec<(String, EffectRecord)>,
        events: Vec<(u64, Event)>,
        max_payload_bytes: u64,
        seed: u64,
    ) -> Ctx {
        let (halt, _) = watch::channel(None);
        Ctx {
            inner: Arc::new(Inner {
                flow,
                epoch,
                group,
                effects: Mutex::new(effects.into_iter().collect()),
                events: Mutex::new(wait::EventView::new(events)),
                next_auto_id: AtomicU64::new(0),
                halt,
                pending: Mutex::new(Vec::new()),
                max_payload_bytes,
                seed,
            }),
        }
    }

    /// The flow this activation runs.
    pub fn flow(&self) -> &FlowId {
        &self.inner.flow
    }

    /// The activation's epoch.
    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// An implicit effect id: `auto-0`, `auto-1`, … in call order. Explicit ids are the
    /// documented default because they survive code edits that reorder or insert steps.
    pub fn auto_id(&self) -> String {
        format!("auto-{}", self.inner.next_auto_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `work` once and records its result (or error); a replay returns the record.
    /// At-least-once by default: a crash before the result is committed runs `work` again. Call
    /// [`Effect::at_most_once`] for work that must never run twice.
    pub fn effect<T, E, F, Fut>(&self, id: impl Into<String>, work: F) -> Effect<'_, T, F>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, E>> + Send,
        E: Into<FlowError>,
        T: Serialize + DeserializeOwned + Send,
    {
        Effect { ctx: self, id: id.into(), work, at_most_once: false, retry: None, _value: PhantomData }
    }

    /// A random UUID (v4), the same on every replay.
    ///
    /// Derived, not drawn: a hash of the run's seed (unique in the shard, new when a restart
    /// clears the effects), the flow id and `id`, so it costs no commit and is the same on every
    /// replay. A value an operator set for `id` (`effect set`) is returned instead.
    pub async fn uuid(&self, id: impl Into<String>) -> Result<uuid::Uuid, FlowError> {
        let id = id.into();
        if let Some(value) = self.recorded_generated(&id, EffectKind::Uuid).await {
            return Ok(value);
        }
        let bits = self.derive(EffectKind::Uuid, &id);
        Ok(uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid())
    }

    /// The wall-clock time, the same on every replay.
    pub async fn now(&self, id: impl Into<String>) -> Result<SystemTime, FlowError> {
        let ms = self.generated(id.into(), EffectKind::Now, now_ms).await?;
        Ok(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// A random number, the same on every replay.
    ///
    /// Derived like [`Ctx::uuid`] (no commit): pseudo-random, not secret.
    pub async fn random(&self, id: impl Into<String>) -> Result<u64, FlowError> {
        let id = id.into();
        if let Some(value) = self.recorded_generated(&id, EffectKind::Random).await {
            return Ok(value);
        }
        Ok(self.derive(EffectKind::Random, &id) as u64)
    }

    /// 128 bits derived from the run's seed, the flow id, the helper's kind and `id`
    /// (length-prefixed, so no two inputs hash the same bytes).
    fn derive(&self, kind: EffectKind, id: &str) -> u128 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let flow = &self.inner.flow;
        for part in [
            flow.flow_type.as_bytes(),
            flow.instance.as_bytes(),
            format!("{kind:?}").as_bytes(),
            id.as_bytes(),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&self.inner.seed.to_le_bytes());
        h.digest128()
    }

    /// The value recorded for a determinism helper's `id` (set by an operator, or by a version
    /// that committed them), checked for drift.
    async fn recorded_generated<T: DeserializeOwned>(&self, id: &str, kind: EffectKind) -> Option<T> {
        let record = self.recorded(id)?;
        if let Err(d) = Self::check_kind(&record, kind) {
            return self.drift(id, d).await;
        }
        match &record.state {
            EffectState::Completed(v) => Some(self.decode(id, v).await),
            other => self.drift(id, format!("recorded in state {other:?}")).await,
        }
    }

    /// A state value stored under `id`, overwritten in place (constant space in loops).
    pub fn state<T: Serialize + DeserializeOwned>(&self, id: impl Into<String>) -> State<'_, T> {
        State { ctx: self, id: id.into(), _value: PhantomData }
    }

    /// Resolves once the activation must end (see [`Halt`]).
    pub(crate) async fn halted(&self) -> Halt {
        let mut rx = self.inner.halt.subscribe();
        loop {
            if let Some(h) = rx.borrow_and_update().clone() {
                return h;
            }
            if rx.changed().await.is_err() {
                return Halt::Fenced("activation dropped".into());
            }
        }
    }

    /// `bytes` if they are within the payload limit; otherwise the flow fails with
    /// `payload_too_large` naming `what` (the step and what of it was too large), and this never
    /// returns into flow code: a value over the limit must not enter the log (a large entry
    /// would stall the shard's replication).
    async fn bounded(&self, what: impl FnOnce() -> String, bytes: Vec<u8>) -> Vec<u8> {
        match over_limit(what, bytes.len(), self.inner.max_payload_bytes) {
            None => bytes,
            Some(error) => self.halt(Halt::Fail(error)).await,
        }
    }

    /// Ends the activation: never returns into flow code.
    async fn halt<T>(&self, halt: Halt) -> T {
        tracing::debug!(flow = %self.inner.flow, epoch = %self.inner.epoch, ?halt, "activation halts");
        self.inner.halt.send_if_modified(|h| {
            if h.is_none() {
                *h = Some(halt);
                true
            } else {
                false
            }
        });
        std::future::pending().await
    }

    fn recorded(&self, id: &str) -> Option<EffectRecord> {
        lock(&self.inner.effects).get(id).cloned()
    }

    fn remember(&self, id: &str, record: Option<EffectRecord>) {
        let mut effects = lock(&self.inner.effects);
        match record {
            Some(r) => effects.insert(id.to_string(), r),
            None => effects.remove(id),
        };
    }

    /// Commits `command`, in one log entry after the pending results; halts the activation if
    /// the journal refuses or cannot take any of them.
    async fn commit(&self, command: ShardCommand) -> ShardOutcome {
        let mut commands = self.take_pending();
        commands.push(command);
        match self.commit_all(commands).await {
            Some(outcome) => outcome,
            None => self.halt(Halt::Fenced("the journal answered no step".into())).await,
        }
    }

    /// Commits the pending results, if any (before work that the outside world sees).
    async fn flush(&self) {
        let commands = self.take_pending();
        if !commands.is_empty() {
            self.commit_all(commands).await;
        }
    }

    /// Commits `commands` in one entry and returns the last one's outcome; halts on a refusal.
    async fn commit_all(&self, commands: Vec<ShardCommand>) -> Option<ShardOutcome> {
        match self.inner.group.propose_shard_all(commands).await {
            Ok(replies) => {
                let mut last = None;
                for reply in replies {
                    match reply {
                        Ok(outcome) => last = Some(outcome),
                        Err(rejection) => {
                            return self
                                .halt(Halt::Fenced(format!("journal refused a step: {rejection}")))
                                .await
                        }
                    }
                }
                last
            }
            Err(e) => self.halt(Halt::Fenced(format!("step not committed: {e}"))).await,
        }
    }

    /// Takes the results not yet committed (the activation's end commits them with the flow's
    /// outcome).
    pub(crate) fn take_pending(&self) -> Vec<ShardCommand> {
        std::mem::take(&mut *lock(&self.inner.pending))
    }

    /// Fails the flow with `replay_drift` naming `id`.
    async fn drift<T>(&self, id: &str, detail: String) -> T {
        let message = format!("effect {id:?}: {detail}");
        self.halt(Halt::Fail(FlowError::new(kind::REPLAY_DRIFT, message))).await
    }

    fn check_kind(record: &EffectRecord, wanted: EffectKind) -> Result<(), String> {
        if record.kind == wanted {
            Ok(())
        } else {
            Err(format!("recorded as {:?}, the code asks for {:?}", record.kind, wanted))
        }
    }

    async fn decode<T: DeserializeOwned>(&self, id: &str, value: &[u8]) -> T {
        match serde_json::from_slice(value) {
            Ok(v) => v,
            Err(e) => {
                self.drift(id, format!("recorded value does not fit the type the code asks for: {e}")).await
            }
        }
    }

    /// uuid / now / random: recorded once, then replayed.
    async fn generated<T: Serialize + DeserializeOwned>(
        &self,
        id: String,
        kind: EffectKind,
        make: impl FnOnce() -> T,
    ) -> Result<T, FlowError> {
        if let Some(record) = self.recorded(&id) {
            if let Err(d) = Self::check_kind(&record, kind) {
                return self.drift(&id, d).await;
            }
            return match &record.state {
                EffectState::Completed(v) => Ok(self.decode(&id, v).await),
                other => self.drift(&id, format!("recorded in state {other:?}")).await,
            };
        }
        let value = make();
        let bytes = serde_json::to_vec(&value).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
        let bytes = self.bounded(|| format!("the value of step {id:?}"), bytes).await;
        let type_name = std::any::type_name::<T>().to_string();
        self.commit(ShardCommand::EffectCompleted {
            flow: self.inner.flow.clone(),
            epoch: self.inner.epoch,
            effect_id: id.clone(),
            kind,
            type_name: type_name.clone(),
            value: bytes.clone(),
        })
        .await;
        self.remember(&id, Some(EffectRecord { kind, type_name, state: EffectState::Completed(bytes) }));
        Ok(value)
    }
}

/// A pending effect; `.await` it (after choosing [`Effect::at_most_once`] if needed).
#[must_use = "an effect does nothing until awaited"]
pub struct Effect<'c, T, F> {
    ctx: &'c Ctx,
    id: String,
    work: F,
    at_most_once: bool,
    retry: Option<RetryPolicy>,
    _value: PhantomData<fn() -> T>,
}

impl<T, F> Effect<'_, T, F> {
    /// Commit a `Started` marker before running the work. A replay that finds the marker without
    /// an outcome never runs the work again and never returns into the flow: the flow ends
    /// `Failed` with kind `effect_outcome_unknown` naming the effect, for an operator to repair.
    pub fn at_most_once(mut self) -> Self {
        self.at_most_once = true;
        self
    }

    /// Retry failed attempts under `policy`. The number of failed attempts is recorded, so a
    /// replay continues the count: at-least-once in the state `"<id>#attempts"`; at-most-once in
    /// the effect's record, which goes from `Started` to `AttemptFailed` (the error and when the
    /// next attempt may start) before the backoff, and to `Started` again before the next
    /// attempt's work — so only an attempt whose outcome was never recorded is unknown. A backoff
    /// longer than `policy.suspend_after` is a durable timer (`"<id>#backoff-<n>"`) that suspends
    /// the flow instead of sleeping in memory. The last attempt's outcome is the effect's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }
}

/// Which errors a [`RetryPolicy`] retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOn {
    /// Every error.
    Any,
    /// Errors of these kinds only.
    Kinds(Vec<String>),
}

/// How an effect's failed attempts are retried: exponential backoff, bounded attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Upper bound of any wait.
    pub max_backoff: Duration,
    /// Each wait is the previous one times this.
    pub multiplier: u32,
    /// Which errors are retried.
    pub retry_on: RetryOn,
    /// Waits longer than this suspend the flow on a durable timer (default 5 s).
    pub suspend_after: Duration,
}

impl RetryPolicy {
    /// `max_attempts` attempts, waiting `initial_backoff`, doubling up to 5 minutes, retrying
    /// every error.
    pub fn exponential(max_attempts: u32, initial_backoff: Duration) -> Self {
        RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff: Duration::from_secs(300),
            multiplier: 2,
            retry_on: RetryOn::Any,
            suspend_after: Duration::from_secs(5),
        }
    }

    /// Retry only errors of these kinds.
    pub fn only(mut self, kinds: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.retry_on = RetryOn::Kinds(kinds.into_iter().map(Into::into).collect());
        self
    }

    /// The wait after `failed` failed attempts (1-based).
    pub fn backoff(&self, failed: u32) -> Duration {
        let factor = u64::from(self.multiplier.max(1)).saturating_pow(failed.saturating_sub(1));
        let ms = (self.initial_backoff.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max_backoff)
    }

    fn retries(&self, error: &FlowError) -> bool {
        match &self.retry_on {
            RetryOn::Any => true,
            RetryOn::Kinds(kinds) => kinds.contains(&error.kind),
        }
    }
}

impl<'c, T, E, F, Fut> IntoFuture for Effect<'c, T, F>
where
    F: FnMut() -> Fut + Send + 'c,
    Fut: Future<Output = Result<T, E>> + Send + 'c,
    E: Into<FlowError> + 'c,
    T: Serialize + DeserializeOwned + Send + 'c,
{
    type Output = Result<T, FlowError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<T, FlowError>> + Send + 'c>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(run_effect(self))
    }
}

async fn run_effect<T, E, F, Fut>(effect: Effect<'_, T, F>) -> Result<T, FlowError>
where
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<T, E>> + Send,
    E: Into<FlowError>,
    T: Serialize + DeserializeOwned + Send,
{
    let Effect { ctx, id, mut work, at_most_once, retry, .. } = effect;
    let flow = ctx.inner.flow.clone();
    let epoch = ctx.inner.epoch;
    let type_name = std::any::type_name::<T>().to_string();
    // A failed attempt recorded by an earlier activation: the retries continue from it.
    let mut resumed: Option<FailedAttempt> = None;
    if let Some(record) = ctx.recorded(&id) {
        if let Err(d) = Ctx::check_kind(&record, EffectKind::Effect) {
            return ctx.drift(&id, d).await;
        }
        match &record.state {
            EffectState::Completed(v) => return Ok(ctx.decode(&id, v).await),
            EffectState::Failed(e) => return Err(FlowError::from_info(e.clone())),
            EffectState::Started if at_most_once && !crate::bugs::planted("amo-rerun") => {
                let message = format!("effect {id:?} was started but its outcome was not recorded");
                return ctx.halt(Halt::Fail(FlowError::new(kind::EFFECT_OUTCOME_UNKNOWN, message))).await;
            }
            // Started by an at-most-once version of the code; this version allows a re-run.
            EffectState::Started => {}
            EffectState::AttemptFailed { attempt, error, retry_at_ms } => {
                resumed = Some(FailedAttempt {
                    failed: *attempt,
                    error: FlowError::from_info(error.clone()),
                    retry_at_ms: *retry_at_ms,
                });
            }
        }
    }
    if !at_most_once {
        // Results recorded so far become durable before the outside world sees this work.
        ctx.flush().await;
    }
    // A planned leadership hand-over of the shard waits (bounded) until this at-most-once work
    // has committed its outcome, so a move never leaves it unknown; the guard lives until the
    // outcome is committed below, or until the activation is dropped.
    let _in_flight = at_most_once.then(|| ctx.inner.group.at_most_once_in_flight());
    let result: Result<T, FlowError> = match (&retry, resumed) {
        // The code no longer retries this effect: the recorded attempt's error is its outcome.
        (None, Some(attempt)) => Err(attempt.error),
        (None, None) => {
            if at_most_once {
                start_attempt(ctx, &id, &type_name).await;
            }
            work().await.map_err(Into::into)
        }
        // The recorded attempt's error is the outcome if the code's policy (changed since) would
        // not have retried it.
        (Some(policy), Some(attempt))
            if !policy.retries(&attempt.error) || attempt.failed >= policy.max_attempts =>
        {
            Err(attempt.error)
        }
        (Some(policy), resumed) => {
            // The count of failed attempts lives in the effect's own record when attempts are
            // at-most-once (each one's error is committed before its backoff), else in a state.
            let attempts = ctx.state::<u32>(format!("{id}#attempts"));
            let (mut failed, mut retry_at_ms) = match resumed {
                Some(attempt) => (attempt.failed, Some(attempt.retry_at_ms)),
                None if at_most_once => (0, None),
                None => (attempts.get().await?.unwrap_or(0), None),
            };
            loop {
                if failed > 0 {
                    let wait = policy.backoff(failed);
                    if wait > policy.suspend_after {
                        // A long wait is a durable timer: it suspends the flow, and a replay (for
                        // whatever reason it runs) waits for the same timer before the next
                        // attempt.
                        let until = retry_at_ms.unwrap_or_else(|| now_ms().saturating_add(millis(wait)));
                        let until = UNIX_EPOCH + Duration::from_millis(until);
                        ctx.sleep_until(format!("{id}#backoff-{failed}"), until).await?;
                    } else if let Some(at) = retry_at_ms {
                        // A short wait is slept in memory; an activation that replays a failed
                        // attempt waits only what is left of it.
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
                    }
                }
                if at_most_once {
                    start_attempt(ctx, &id, &type_name).await;
                }
                match work().await.map_err(Into::into) {
                    Err(e) if policy.retries(&e) && failed + 1 < policy.max_attempts => {
                        failed += 1;
                        let wait = policy.backoff(failed);
                        let at = now_ms().saturating_add(millis(wait));
                        tracing::debug!(flow = %flow, effect = id, attempt = failed, ?wait, error = %e, "retrying");
                        if at_most_once {
                            // The attempt's outcome is known: recording it before the backoff
                            // lets whichever activation runs next start the next attempt instead
                            // of finding a bare `Started` (outcome unknown).
                            attempt_failed(ctx, &id, &type_name, failed, &e, at).await;
                        } else {
                            attempts.set(&failed).await?;
                        }
                        retry_at_ms = Some(at);
                    }
                    other => break other,
                }
            }
        }
    };
    let (command, state) = match &result {
        Ok(value) => {
            let bytes = serde_json::to_vec(value).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
            let bytes = ctx.bounded(|| format!("the value of effect {id:?}"), bytes).await;
            let command = ShardCommand::EffectCompleted {
                flow,
                epoch,
                effect_id: id.clone(),
                kind: EffectKind::Effect,
                type_name: type_name.clone(),
                value: bytes.clone(),
            };
            (command, EffectState::Completed(bytes))
        }
        Err(error) => {
            let size = error.kind.len() + error.message.len();
            let what = || format!("the error of effect {id:?}");
            if let Some(too_large) = over_limit(what, size, ctx.inner.max_payload_bytes) {
                return ctx.halt(Halt::Fail(too_large)).await;
            }
            let command = ShardCommand::EffectFailed {
                flow,
                epoch,
                effect_id: id.clone(),
                kind: EffectKind::Effect,
                type_name: type_name.clone(),
                error: error.clone().into(),
            };
            (command, EffectState::Failed(error.clone().into()))
        }
    };
    if at_most_once {
        // The outcome of at-most-once work is recorded at once: until then, a crash makes it
        // unknown.
        ctx.commit(command).await;
    } else {
        // At-least-once: a crash before the next write runs `work` again, as a crash before any
        // commit of its result would (DESIGN.md §1.3); the next write comes before any other
        // work starts.
        lock(&ctx.inner.pending).push(command);
    }
    ctx.remember(&id, Some(EffectRecord { kind: EffectKind::Effect, type_name, state }));
    result
}

/// The `payload_too_large` error of `what` (the step and what of it), `size` bytes, if that is
/// over `limit`.
pub(crate) fn over_limit(what: impl FnOnce() -> String, size: usize, limit: u64) -> Option<FlowError> {
    (size as u64 > limit).then(|| {
        let message = format!("{} is {size} bytes, over the payload limit of {limit} bytes", what());
        FlowError::new(kind::PAYLOAD_TOO_LARGE, message)
    })
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An attempt of an effect that failed with an error its retry policy retries.
struct FailedAttempt {
    /// Failed attempts so far (1-based).
    failed: u32,
    /// The last attempt's error.
    error: FlowError,
    /// When the next attempt may start (ms since the Unix epoch).
    retry_at_ms: u64,
}

/// Commits the `Started` marker of an at-most-once attempt (on an absent effect or after a failed
/// attempt) and makes sure this node still leads before the work may run.
async fn start_attempt(ctx: &Ctx, id: &str, type_name: &str) {
    ctx.commit(ShardCommand::EffectStarted {
        flow: ctx.inner.flow.clone(),
        epoch: ctx.inner.epoch,
        effect_id: id.to_string(),
        kind: EffectKind::Effect,
        type_name: type_name.to_string(),
    })
    .await;
    let record = EffectRecord {
        kind: EffectKind::Effect,
        type_name: type_name.to_string(),
        state: EffectState::Started,
    };
    ctx.remember(id, Some(record));
    // The reply may reach a leader that was frozen since (SIGSTOP, a long pause) and has been
    // replaced: a quorum must confirm it still leads before the work may start.
    if let Err(e) = ctx.inner.group.confirm_leadership().await {
        let reason = format!("leadership not confirmed before an at-most-once effect: {e}");
        ctx.halt::<()>(Halt::Fenced(reason)).await;
    }
}

/// Commits that the at-most-once attempt in flight failed with `error` (attempt `failed`) and
/// that the next one may start at `retry_at_ms`.
async fn attempt_failed(
    ctx: &Ctx,
    id: &str,
    type_name: &str,
    failed: u32,
    error: &FlowError,
    retry_at_ms: u64,
) {
    let error: ErrorInfo = error.clone().into();
    ctx.commit(ShardCommand::EffectAttemptFailed {
        flow: ctx.inner.flow.clone(),
        epoch: ctx.inner.epoch,
        effect_id: id.to_string(),
        attempt: failed,
        error: error.clone(),
        retry_at_ms,
    })
    .await;
    let state = EffectState::AttemptFailed { attempt: failed, error, retry_at_ms };
    ctx.remember(
        id,
        Some(EffectRecord { kind: EffectKind::Effect, type_name: type_name.to_string(), state }),
    );
}

/// A state value of a flow; see [`Ctx::state`].
pub struct State<'c, T> {
    ctx: &'c Ctx,
    id: String,
    _value: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> State<'_, T> {
    /// The current value, if set.
    pub async fn get(&self) -> Result<Option<T>, FlowError> {
        match self.ctx.recorded(&self.id) {
            None => Ok(None),
            Some(record) => {
                if let Err(d) = Ctx::check_kind(&record, EffectKind::State) {
                    return self.ctx.drift(&self.id, d).await;
                }
                match &record.state {
                    EffectState::Completed(v) => Ok(Some(self.ctx.decode(&self.id, v).await)),
                    other => self.ctx.drift(&self.id, format!("state recorded as {other:?}")).await,
                }
            }
        }
    }

    /// Sets the value (overwriting it in place).
    pub async fn set(&self, value: &T) -> Result<(), FlowError> {
        if let Some(record) = self.ctx.recorded(&self.id) {
            if let Err(d) = Ctx::check_kind(&record, EffectKind::State) {
                return self.ctx.drift(&self.id, d).await;
            }
        }
        let bytes = serde_json::to_vec(value).map_err(|e| FlowError::new(kind::ERROR, e.to_string()))?;
        let bytes = self.ctx.bounded(|| format!("the value of state {:?}", self.id), bytes).await;
        let type_name = std::any::type_name::<T>().to_string();
        self.ctx
            .commit(ShardCommand::StateSet {
                flow: self.ctx.inner.flow.clone(),
                epoch: self.ctx.inner.epoch,
                state_id: self.id.clone(),
                type_name: type_name.clone(),
                value: bytes.clone(),
            })
            .await;
        self.ctx.remember(
            &self.id,
            Some(EffectRecord { kind: EffectKind::State, type_name, state: EffectState::Completed(bytes) }),
        );
        Ok(())
    }

    /// Removes the value.
    pub async fn clear(&self) -> Result<(), FlowError> {
        match self.ctx.recorded(&self.id) {
            None => return Ok(()),
            Some(record) => {
                if let Err(d) = Ctx::check_kind(&record, EffectKind::State) {
                    return self.ctx.drift(&self.id, d).await;
                }
            }
        }
        self.ctx
            .commit(ShardCommand::StateClear {
                flow: self.ctx.inner.flow.clone(),
                epoch: self.ctx.inner.epoch,
                state_id: self.id.clone(),
            })
            .await;
        self.ctx.remember(&self.id, None);
        Ok(())
    }
}
