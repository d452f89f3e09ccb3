//! The `ShardActor`: on the leader of a shard group, it makes flows run.
//!
//! It follows the group's applied actions (and, on becoming leader or after lagging, re-derives
//! them from state with `shard::derive_actions`): it activates `Running` flows — one `FlowActor`
//! per flow at most — arms in-memory timers for armed deadlines and fires them by committing
//! `FireTimer`, and stops every `FlowActor` when leadership is lost or the group has had no
//! quorum acknowledgement for longer than the election timeout (openraft 0.9 has no check-quorum,
//! so a frozen-then-woken leader must fence itself). A flow that waits is suspended and has no
//! actor: waiting costs only disk.
//!
//! It also delivers the shard's outbox (messages to other flows, child starts and results): in
//! order per target shard, one delivery in flight per target, each entry acknowledged with
//! `OutboxAck` only after the target applied it — a new leader resends what is unacknowledged
//! and the target skips what it has seen. Targets are reached through a [`Router`] (groups on
//! this node today; forwarding to other nodes comes with the cluster).
//!
//! Postpone timers are ordinary timers here: firing one makes the flow `Running` again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{FlowId, ShardId};
use fetter_raft::shard::{self, Action, Rejection, ShardCommand};
use fetter_raft::sync::now_ms;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use crate::activation::Outcome;
use crate::flow_actor::{FlowActor, FlowArgs};
use crate::registry::Registry;

/// Bound on the flows one GC command deletes.
const GC_BATCH: u32 = 1_000;
/// Bound on the outbox entries delivered in one command.
const DELIVERY_BATCH: usize = 256;
/// Bound on the flows activated and timers armed per re-derivation pass.
const DERIVE_LIMIT: usize = 10_000;
/// How often leadership and quorum are checked.
const TICK: Duration = Duration::from_millis(100);
/// Delay before a flow whose activation was fenced (while it is still `Running`) is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Messages of the shard actor.
#[derive(Debug)]
pub enum ShardMsg {
    /// Actions emitted by applied commands.
    Actions(Arc<Vec<Action>>),
    /// Re-derive all pending work from state (leadership gained, lagged, snapshot installed).
    Rederive,
    /// An activation ended.
    Ended {
        /// The flow.
        flow: FlowId,
        /// How it ended.
        outcome: Result<Outcome, String>,
    },
    /// A timer's deadline passed.
    TimerDue {
        /// The flow.
        flow: FlowId,
        /// The timer.
        timer_id: String,
    },
    /// Check leadership and quorum.
    Tick,
    /// A delivery run to `target` ended.
    Delivered {
        /// The target shard.
        target: ShardId,
    },
}

/// Finds the group of a shard, to deliver outbox entries to it.
pub trait Router: Send + Sync + 'static {
    /// A handle that proposes to `shard`'s group, if reachable from here.
    fn group(&self, shard: ShardId) -> Option<GroupHandle>;
}

impl Router for HashMap<ShardId, GroupHandle> {
    fn group(&self, shard: ShardId) -> Option<GroupHandle> {
        self.get(&shard).cloned()
    }
}

/// Configuration of a shard actor.
pub struct ShardArgs {
    /// The shard.
    pub shard: ShardId,
    /// The shard's group on this node.
    pub group: GroupHandle,
    /// How to reach other shards' groups.
    pub router: Arc<dyn Router>,
    /// The flows this node runs.
    pub registry: Registry,
    /// After this long without a quorum acknowledgement a leader stops its flows.
    pub election_timeout: Duration,
    /// Finished flows are deleted this long after they finished (a cluster parameter).
    pub retention: Duration,
    /// How often the leader proposes retention garbage collection.
    pub gc_every: Duration,
}

impl ShardArgs {
    /// Arguments with the default retention (7 days, collected every minute).
    pub fn new(
        shard: ShardId,
        group: GroupHandle,
        router: Arc<dyn Router>,
        registry: Registry,
        election_timeout: Duration,
    ) -> Self {
        ShardArgs {
            shard,
            group,
            router,
            registry,
            election_timeout,
            retention: Duration::from_secs(7 * 24 * 3600),
            gc_every: Duration::from_secs(60),
        }
    }
}

/// Observable counters of a running shard actor.
#[derive(Clone, Default)]
pub struct ShardStats {
    live_flows: Arc<AtomicUsize>,
}

impl ShardStats {
    /// `FlowActor`s alive now (flows being activated or running; waiting flows have none).
    pub fn live_flows(&self) -> usize {
        self.live_flows.load(Ordering::SeqCst)
    }
}

/// The shard actor.
pub struct ShardActor {
    stats: ShardStats,
}

impl ShardActor {
    /// Spawns the actor for `args.group`, with tasks feeding it the group's actions, leadership
    /// changes and ticks. Returns its reference and its counters.
    pub async fn start(args: ShardArgs) -> Result<(ActorRef<ShardMsg>, ShardStats), ractor::SpawnErr> {
        let stats = ShardStats::default();
        let group = args.group.clone();
        let (actor, _) = Actor::spawn(None, ShardActor { stats: stats.clone() }, args).await?;
        tokio::spawn(feed(group, actor.clone()));
        Ok((actor, stats))
    }
}

/// Forwards actions, leadership changes and ticks to the actor until it stops.
async fn feed(group: GroupHandle, actor: ActorRef<ShardMsg>) {
    let mut actions = group.subscribe_actions();
    let mut status = group.status();
    let mut tick = tokio::time::interval(TICK);
    let mut was_leader = false;
    loop {
        let sent = tokio::select! {
            a = actions.recv() => match a {
                Ok(a) => actor.send_message(ShardMsg::Actions(a)),
                Err(RecvError::Lagged(_)) => actor.send_message(ShardMsg::Rederive),
                Err(RecvError::Closed) => return,
            },
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                let leader = status.borrow_and_update().is_leader;
                let msg = if leader && !was_leader { ShardMsg::Rederive } else { ShardMsg::Tick };
                was_leader = leader;
                actor.send_message(msg)
            }
            _ = tick.tick() => actor.send_message(ShardMsg::Tick),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// State of a shard actor.
pub struct ShardState {
    args: ShardArgs,
    leading: bool,
    /// Flows with a live `FlowActor`, and whether they must be activated again when it ends.
    active: HashMap<FlowId, (ActorRef<()>, bool)>,
    /// Armed in-memory timers.
    timers: HashMap<(FlowId, String), JoinHandle<()>>,
    /// Delivery runs in flight per target, and whether another run is wanted after them.
    delivering: HashMap<ShardId, (JoinHandle<()>, bool)>,
    /// When retention GC last ran (or leadership began).
    last_gc: tokio::time::Instant,
    /// A GC command is in flight.
    collecting: Option<JoinHandle<()>>,
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let _ = myself.send_message(ShardMsg::Tick);
        Ok(ShardState {
            args,
            leading: false,
            active: HashMap::new(),
            timers: HashMap::new(),
            delivering: HashMap::new(),
            last_gc: tokio::time::Instant::now(),
            collecting: None,
        })
    }

    /// Flow actors are linked to this actor. One that ends normally has already reported
    /// `Ended`; one that failed (a bug outside flow code: flow panics are caught) is forgotten
    /// and its flow re-derived from state. Neither stops the shard actor (ractor's default).
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<ShardMsg>,
        event: SupervisionEvent,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(who, reason) = event {
            tracing::error!(group = %state.args.group.group(), %reason, "a flow actor failed");
            state.active.retain(|_, (flow_actor, _)| flow_actor.get_id() != who.get_id());
            self.stats.live_flows.store(state.active.len(), Ordering::SeqCst);
            let _ = myself.send_message(ShardMsg::Rederive);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<ShardMsg>,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        self.stop_all(state);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Tick => {
                self.check_leadership(&myself, state);
                self.maybe_collect(state);
            }
            ShardMsg::Rederive => {
                self.check_leadership(&myself, state);
                if state.leading {
                    let derived = state.args.group.read_local(|kv| shard::derive_actions(kv, DERIVE_LIMIT));
                    match derived {
                        Ok(actions) => {
                            for action in actions {
                                self.on_action(&myself, state, action);
                            }
                        }
                        Err(e) => {
                            tracing::error!(group = %state.args.group.group(), error = %e, "cannot derive actions")
                        }
                    }
                }
            }
            ShardMsg::Actions(actions) => {
                if state.leading {
                    for action in actions.iter() {
                        self.on_action(&myself, state, action.clone());
                    }
                }
            }
            ShardMsg::Ended { flow, outcome } => {
                let again = state.active.remove(&flow).is_some_and(|(_, again)| again);
                self.stats.live_flows.store(state.active.len(), Ordering::SeqCst);
                match outcome {
                    Ok(Outcome::Fenced(reason)) if state.leading => {
                        tracing::debug!(flow = %flow, reason, "activation fenced; will check the flow again");
                        self.retry_later(&myself, state, flow);
                    }
                    Err(e) if state.leading => {
                        tracing::warn!(flow = %flow, error = e, "activation failed to run; will retry");
                        self.retry_later(&myself, state, flow);
                    }
                    _ if again && state.leading => self.activate(&myself, state, flow),
                    _ => {}
                }
            }
            ShardMsg::Delivered { target } => {
                let again = state.delivering.remove(&target).is_some_and(|(_, again)| again);
                if again && state.leading {
                    self.deliver(&myself, state, target);
                }
            }
            ShardMsg::TimerDue { flow, timer_id } => {
                state.timers.remove(&(flow.clone(), timer_id.clone()));
                if state.leading {
                    self.fire(&myself, state, flow, timer_id);
                }
            }
        }
        Ok(())
    }
}

impl ShardActor {
    fn check_leadership(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        let status = state.args.group.status().borrow().clone();
        let acked_recently = status.since_quorum_ack().is_some_and(|d| d <= state.args.election_timeout);
        let leading = status.is_leader && acked_recently;
        if leading && !state.leading {
            state.leading = true;
            let _ = myself.send_message(ShardMsg::Rederive);
        } else if !leading && state.leading {
            tracing::info!(group = %state.args.group.group(), "not leading (or no quorum ack): stopping flows");
            state.leading = false;
            self.stop_all(state);
        }
    }

    fn stop_all(&self, state: &mut ShardState) {
        for (_, (flow_actor, _)) in state.active.drain() {
            flow_actor.stop(None);
        }
        for (_, task) in state.timers.drain() {
            task.abort();
        }
        for (_, (task, _)) in state.delivering.drain() {
            task.abort();
        }
        self.stats.live_flows.store(0, Ordering::SeqCst);
    }

    fn on_action(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, action: Action) {
        match action {
            Action::Activate { flow } => self.activate(myself, state, flow),
            Action::Fence { flow } => {
                // The running activation's steps are refused from now on; stop it early and run
                // the flow again if it is still runnable (restart, effect repair).
                if let Some((flow_actor, again)) = state.active.get_mut(&flow) {
                    flow_actor.stop(None);
                    *again = true;
                    let _ = myself.send_message(ShardMsg::Ended {
                        flow,
                        outcome: Ok(Outcome::Fenced("fenced".into())),
                    });
                }
            }
            Action::ArmTimer { flow, timer_id, deadline_ms } => {
                self.arm(myself, state, flow, timer_id, deadline_ms)
            }
            // Running activations read new events themselves (and `Suspend` answers `Resume`).
            Action::EventAppended { .. } | Action::Finished { .. } => {}
            Action::DeliverOutbox { target } => self.deliver(myself, state, target),
        }
    }

    fn activate(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, flow: FlowId) {
        if let Some((_, again)) = state.active.get_mut(&flow) {
            *again = true;
            return;
        }
        let args = FlowArgs {
            group: state.args.group.clone(),
            registry: state.args.registry.clone(),
            flow: flow.clone(),
            shard: myself.clone(),
        };
        match ractor::ActorRuntime::spawn_linked_instant(None, FlowActor, args, myself.get_cell()) {
            Ok((flow_actor, _)) => {
                state.active.insert(flow, (flow_actor, false));
                self.stats.live_flows.store(state.active.len(), Ordering::SeqCst);
            }
            Err(e) => {
                tracing::error!(flow = %flow, error = %e, "cannot spawn a flow actor; will retry");
                self.retry_later(myself, state, flow);
            }
        }
    }

    fn retry_later(&self, myself: &ActorRef<ShardMsg>, state: &ShardState, flow: FlowId) {
        let me = myself.clone();
        let group = state.args.group.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RETRY_AFTER).await;
            // Only a flow that is still runnable is activated again.
            let runnable = group
                .read_local(|kv| shard::get_flow(kv, &flow))
                .ok()
                .flatten()
                .is_some_and(|r| r.status == shard::FlowStatus::Running);
            if runnable {
                let _ = me.send_message(ShardMsg::Actions(Arc::new(vec![Action::Activate { flow }])));
            }
        });
    }

    fn arm(
        &self,
        myself: &ActorRef<ShardMsg>,
        state: &mut ShardState,
        flow: FlowId,
        timer_id: String,
        deadline_ms: u64,
    ) {
        let key = (flow.clone(), timer_id.clone());
        if state.timers.contains_key(&key) {
            return;
        }
        let me = myself.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(until(deadline_ms)).await;
            let _ = me.send_message(ShardMsg::TimerDue { flow, timer_id });
        });
        state.timers.insert(key, task);
    }

    fn fire(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, flow: FlowId, timer_id: String) {
        let (group, me) = (state.args.group.clone(), myself.clone());
        let key = (flow.clone(), timer_id.clone());
        let task = tokio::spawn(async move {
            let fire = ShardCommand::FireTimer { flow: flow.clone(), timer_id: timer_id.clone() };
            match group.propose_shard(fire).await {
                Ok(Ok(_)) => {}
                // The shard's clock (the proposers' clocks, made monotonic) is behind ours.
                Ok(Err(Rejection::TimerNotDue { deadline_ms })) => {
                    tokio::time::sleep(until(deadline_ms).max(Duration::from_millis(10))).await;
                    let _ = me.send_message(ShardMsg::TimerDue { flow, timer_id });
                }
                Ok(Err(r)) => tracing::debug!(flow = %flow, timer_id, rejection = %r, "timer not fired"),
                Err(e) => {
                    tracing::warn!(flow = %flow, timer_id, error = %e, "firing a timer failed; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    let _ = me.send_message(ShardMsg::TimerDue { flow, timer_id });
                }
            }
        });
        state.timers.insert(key, task);
    }
}

impl ShardActor {
    /// Proposes retention GC when it is due: finished flows older than the retention period are
    /// deleted. The cutoff is computed here and travels in the command (`apply` reads no clock).
    fn maybe_collect(&self, state: &mut ShardState) {
        if !state.leading
            || state.last_gc.elapsed() < state.args.gc_every
            || state.collecting.as_ref().is_some_and(|t| !t.is_finished())
        {
            return;
        }
        state.last_gc = tokio::time::Instant::now();
        let cutoff_ms = now_ms().saturating_sub(state.args.retention.as_millis() as u64);
        let group = state.args.group.clone();
        state.collecting = Some(tokio::spawn(async move {
            let gc = ShardCommand::Gc { cutoff_ms, max_flows: GC_BATCH };
            match group.propose_shard(gc).await {
                Ok(Ok(outcome)) => tracing::debug!(group = %group.group(), ?outcome, "retention GC"),
                Ok(Err(r)) => tracing::warn!(group = %group.group(), rejection = %r, "retention GC refused"),
                Err(e) => tracing::debug!(group = %group.group(), error = %e, "retention GC not committed"),
            }
        }));
    }

    fn deliver(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, target: ShardId) {
        if let Some((_, again)) = state.delivering.get_mut(&target) {
            *again = true;
            return;
        }
        let (me, group, router, source) =
            (myself.clone(), state.args.group.clone(), state.args.router.clone(), state.args.shard);
        let task = tokio::spawn(async move {
            if let Err(e) = deliver_outbox(&group, router.as_ref(), source, target).await {
                tracing::warn!(source = %source, target = %target, error = e, "outbox delivery stopped; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
                let _ = me.send_message(ShardMsg::Actions(Arc::new(vec![Action::DeliverOutbox { target }])));
            }
            let _ = me.send_message(ShardMsg::Delivered { target });
        });
        state.delivering.insert(target, (task, false));
    }
}

/// Delivers everything pending in `source`'s outbox to `target`, in order, acknowledging what
/// the target applied.
async fn deliver_outbox(
    group: &GroupHandle,
    router: &dyn Router,
    source: ShardId,
    target: ShardId,
) -> Result<(), String> {
    let target_group = router.group(target).ok_or_else(|| format!("no route to shard {target}"))?;
    loop {
        let pending = group
            .read_local(|kv| shard::outbox_pending(kv, target, DELIVERY_BATCH))
            .map_err(|e| e.to_string())?;
        let (Some(&(first_seq, _)), Some(&(last_seq, _))) = (pending.first(), pending.last()) else {
            return Ok(());
        };
        let entries = pending.into_iter().map(|(_, e)| e).collect();
        let deliver = ShardCommand::OutboxDeliver { source, first_seq, entries };
        // Entries the target already applied (a run cut off before its acknowledgement) are
        // skipped there; a gap cannot happen as long as only applied entries are acknowledged.
        target_group
            .submit_shard(deliver)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|r| format!("target refused delivery: {r}"))?;
        let ack = ShardCommand::OutboxAck { target, upto_seq: last_seq };
        group.propose_shard(ack).await.map_err(|e| e.to_string())?.map_err(|r| r.to_string())?;
    }
}

/// Time left until `deadline_ms` (wall clock), zero if past.
fn until(deadline_ms: u64) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(now_ms()))
}
