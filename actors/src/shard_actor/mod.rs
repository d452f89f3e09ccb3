//! The `ShardActor`: on the leader of a shard group, it makes flows run.
//!
//! It follows the group's applied actions and, on becoming leader (or after lagging behind
//! them), derives its work from the shard's state again, in pages:
//! - **activations**: every `Running` flow gets one `FlowActor` (at most one per flow); at most
//!   [`Tuning::max_activations`] run at once and the rest wait in a bounded queue. The running
//!   index is read a page at a time as slots free up, so any number of runnable flows is picked
//!   up; an `Activate` that finds the queue full is found again by the next pass over the index.
//! - **timers**: only timers due within [`Tuning::timer_horizon`] are held in memory (a bounded
//!   set ordered by deadline, one sleeping task for the earliest); the timer index is scanned
//!   every [`Tuning::timer_scan_every`] for the ones that came within the horizon. A timer armed
//!   again with another deadline (earlier or later) moves. Firing commits `FireTimer`, a bounded
//!   number at once. A flow waiting three days costs disk, not memory.
//! - **outbox**: messages to other flows, child starts and results are delivered in order per
//!   target shard, one delivery run in flight per target, each entry acknowledged with
//!   `OutboxAck` only after the target applied it — a new leader resends what is unacknowledged
//!   and the target skips what it has seen. Targets are reached through a [`Router`].
//! - **retention**: finished flows older than the retention period are deleted.
//!
//! It stops every `FlowActor` when leadership is lost or the group has had no quorum
//! acknowledgement for longer than the election timeout (openraft 0.9 has no check-quorum, so a
//! frozen-then-woken leader must fence itself). A flow that waits is suspended and has no actor.
//!
//! A shard actor runs under a supervisor ([`ShardActor::start`]): one that fails is replaced at
//! once. Every background task it starts is owned by its state and aborted with it.
//!
//! Postpone timers are ordinary timers here: firing one makes the flow `Running` again.

mod params;
mod queue;
mod supervisor;
mod timers;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{Epoch, FlowId, ShardId};
use fetter_raft::shard::{self, Action, Rejection, ShardCommand};
use fetter_raft::sync::now_ms;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::broadcast::error::RecvError;

use crate::activation::Outcome;
use crate::flow_actor::{FlowActor, FlowArgs};
use crate::registry::Registry;
use crate::task::Task;
pub use params::Params;
use queue::Queue;
pub use supervisor::SupervisorMsg;
use supervisor::{Current, Supervisor};
use timers::{TimerKey, Timers};

/// Bound on the flows one GC command deletes.
const GC_BATCH: u32 = 1_000;
/// Bound on the outbox entries delivered in one command.
const DELIVERY_BATCH: usize = 256;
/// Bound on the stored bytes of the outbox entries delivered in one command (past the first,
/// which always goes): a delivery is one proposal on the target shard, and a log entry there
/// must stay small enough to replicate within a heartbeat interval.
const DELIVERY_BYTES: usize = 1024 * 1024;
/// How often leadership and quorum are checked.
const TICK: Duration = Duration::from_millis(100);
/// Delay before a flow whose activation was fenced (while it is still `Running`) is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Delay before the timer index is scanned again when the in-memory set had no room for all
/// timers within the horizon.
const TRUNCATED_RESCAN: Duration = Duration::from_secs(1);

/// Bounds and pacing of a shard actor's work. The defaults suit production; tests shrink them to
/// reach the paging paths with few flows.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Rows read from the running index or the timer index per page.
    pub page: usize,
    /// Flow activations running at once on this shard.
    pub max_activations: usize,
    /// Flows waiting for an activation slot in memory (beyond it, the running index holds them).
    pub max_queued: usize,
    /// Timers due within this horizon are held in memory.
    pub timer_horizon: Duration,
    /// How often the timer index is scanned for timers that came within the horizon. Keep it
    /// well below the horizon so a timer is in memory before its deadline.
    pub timer_scan_every: Duration,
    /// Timers held in memory at most (besides those being fired).
    pub max_timers_in_memory: usize,
    /// `FireTimer` proposals in flight at once.
    pub max_firing: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            page: 1_000,
            max_activations: 1_024,
            max_queued: 8_192,
            timer_horizon: Duration::from_secs(60),
            timer_scan_every: Duration::from_secs(10),
            max_timers_in_memory: 100_000,
            max_firing: 256,
        }
    }
}

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
        /// The flow actor that ran it (a report of a replaced actor is ignored).
        actor: ActorId,
        /// How it ended.
        outcome: Result<Outcome, String>,
    },
    /// Read the next page of the running index.
    ScanRunning,
    /// Read the next page of the timer index.
    ScanTimers,
    /// The earliest in-memory timer may be due.
    TimerWake,
    /// A `FireTimer` proposal ended; `retry_at_ms` is when to try again, if it must be.
    TimerFired {
        /// The timer.
        key: (FlowId, String),
        /// When to fire again (not yet due on the shard's clock, or not committed).
        retry_at_ms: Option<u64>,
    },
    /// Check leadership and quorum.
    Tick,
    /// A delivery run to `target` ended.
    Delivered {
        /// The target shard.
        target: ShardId,
    },
    /// A test hook: the actor panics while handling this message.
    #[cfg(feature = "test-hooks")]
    Panic,
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
#[derive(Clone)]
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
    /// Cluster parameters (retention, payload limit), followed while the actor runs.
    pub params: Params,
    /// How often the leader proposes retention garbage collection, at most (it runs at least
    /// twice per retention period, and at most every 100 ms).
    pub gc_every: Duration,
    /// Bounds and pacing.
    pub tuning: Tuning,
}

impl ShardArgs {
    /// Arguments with the default parameters (7 days of retention, collected every minute) and
    /// tuning.
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
            params: Params::default(),
            gc_every: Duration::from_secs(60),
            tuning: Tuning::default(),
        }
    }
}

/// Observable counters of a running shard actor (they survive its restarts).
#[derive(Clone, Default)]
pub struct ShardStats {
    live_flows: Arc<AtomicUsize>,
    queued_flows: Arc<AtomicUsize>,
    timers_in_memory: Arc<AtomicUsize>,
    restarts: Arc<AtomicU64>,
}

impl ShardStats {
    /// `FlowActor`s alive now (flows being activated or running; waiting flows have none).
    pub fn live_flows(&self) -> usize {
        self.live_flows.load(Ordering::SeqCst)
    }

    /// Runnable flows waiting in memory for an activation slot.
    pub fn queued_flows(&self) -> usize {
        self.queued_flows.load(Ordering::SeqCst)
    }

    /// Timers held in memory (due within the horizon, or being fired).
    pub fn timers_in_memory(&self) -> usize {
        self.timers_in_memory.load(Ordering::SeqCst)
    }

    /// How often the shard actor failed and was replaced.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }
}

/// A running, supervised shard actor.
pub struct ShardHandle {
    supervisor: ActorRef<SupervisorMsg>,
    current: Current,
}

impl ShardHandle {
    /// Stops the shard actor (and its flow actors and tasks) for good.
    pub fn stop(&self) {
        self.supervisor.stop(None);
    }

    /// Makes the current shard actor panic (a test hook: its supervisor must replace it).
    #[cfg(feature = "test-hooks")]
    pub fn inject_panic(&self) {
        let current = self.current.lock().ok().and_then(|c| c.clone());
        if let Some(actor) = current {
            let _ = actor.send_message(ShardMsg::Panic);
        }
    }

    /// The shard actor running now (it changes when one fails and is replaced).
    pub fn current(&self) -> Option<ActorRef<ShardMsg>> {
        self.current.lock().ok().and_then(|c| c.clone())
    }
}

/// The shard actor.
pub struct ShardActor {
    stats: ShardStats,
}

impl ShardActor {
    /// Spawns a supervised shard actor for `args.group`; it feeds itself the group's actions,
    /// leadership changes and ticks. Returns its handle and its counters.
    pub async fn start(args: ShardArgs) -> Result<(ShardHandle, ShardStats), ractor::SpawnErr> {
        let stats = ShardStats::default();
        let current: Current = Arc::default();
        let supervisor = Supervisor { stats: stats.clone(), current: current.clone() };
        let (supervisor, _) = Actor::spawn(None, supervisor, args).await?;
        Ok((ShardHandle { supervisor, current }, stats))
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

/// A pass over an index, a page at a time.
#[derive(Debug, Default)]
enum Pass<C> {
    /// No pass is under way.
    #[default]
    Idle,
    /// A pass is under way; the next page starts after the cursor (`None`: from the start).
    At {
        /// The last row of the previous page.
        after: Option<C>,
        /// A `Scan…` message for the next page is on its way.
        requested: bool,
    },
}

/// State of a shard actor.
pub struct ShardState {
    args: ShardArgs,
    leading: bool,
    /// Feeds actions, status changes and ticks to the actor.
    _feed: Task,
    /// Flows with a live `FlowActor`, and whether they must be activated again when it ends.
    active: HashMap<FlowId, (ActorRef<()>, bool)>,
    /// Runnable flows waiting for a slot.
    queue: Queue,
    /// Runnable flows of a type this node does not run: not activated again while this node
    /// leads (a passing scan skips them), unless an action asks for them (a repair).
    parked: HashSet<FlowId>,
    /// New flows whose first activation (this epoch) was committed with their start and is this
    /// node's ([`Action::Started`]): run without an `Activate` commit. Dropped when leadership
    /// is lost (a later leadership activates as usual).
    claims: HashMap<FlowId, Epoch>,
    /// The pass over the running index; `rescan`: another pass is wanted after it.
    running_pass: Pass<FlowId>,
    rescan: bool,
    /// Timers due within the horizon.
    timers: Timers,
    /// The pass over the timer index, and the deadline bound it reads up to.
    timer_pass: Pass<(u64, FlowId, String)>,
    timer_pass_upto_ms: u64,
    next_timer_scan: tokio::time::Instant,
    /// The task that sleeps until the earliest timer, and that deadline.
    wake: Option<(u64, Task)>,
    /// `FireTimer` proposals in flight.
    firing: HashMap<TimerKey, Task>,
    /// Delivery runs in flight per target, and whether another run is wanted after them.
    delivering: HashMap<ShardId, (Task, bool)>,
    /// When retention GC last ran (or leadership began).
    last_gc: tokio::time::Instant,
    /// A GC command is in flight.
    collecting: Option<Task>,
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
        let tuning = args.tuning;
        let state = ShardState {
            _feed: Task::spawn(feed(args.group.clone(), myself.clone())),
            args,
            leading: false,
            active: HashMap::new(),
            queue: Queue::new(tuning.max_queued),
            parked: HashSet::new(),
            claims: HashMap::new(),
            running_pass: Pass::Idle,
            rescan: false,
            timers: Timers::new(tuning.max_timers_in_memory),
            timer_pass: Pass::Idle,
            timer_pass_upto_ms: 0,
            next_timer_scan: tokio::time::Instant::now(),
            wake: None,
            firing: HashMap::new(),
            delivering: HashMap::new(),
            last_gc: tokio::time::Instant::now(),
            collecting: None,
        };
        // A replacement of a failed actor starts from nothing: so do its counters.
        self.publish(&state);
        Ok(state)
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
            self.publish(state);
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
                self.maybe_scan_timers(&myself, state);
            }
            ShardMsg::Rederive => {
                self.check_leadership(&myself, state);
                if state.leading {
                    self.rederive(&myself, state);
                }
            }
            ShardMsg::Actions(actions) => {
                if state.leading {
                    for action in actions.iter() {
                        self.on_action(&myself, state, action.clone());
                    }
                    self.pump(&myself, state);
                    self.schedule_wake(&myself, state);
                }
            }
            ShardMsg::Ended { flow, actor, outcome } => {
                // Only the report of the flow's current actor counts: a late report of an actor
                // that was replaced (fenced, then activated again) must not free the new one's
                // slot, or two activations of the flow could run here.
                let current = state.active.get(&flow).is_some_and(|(a, _)| a.get_id() == actor);
                if !current {
                    return Ok(());
                }
                let again = state.active.remove(&flow).is_some_and(|(_, again)| again);
                match outcome {
                    Ok(Outcome::Fenced(reason)) if state.leading => {
                        tracing::debug!(flow = %flow, reason, "activation fenced; will check the flow again");
                        self.retry_later(&myself, state, flow);
                    }
                    Err(e) if state.leading => {
                        tracing::warn!(flow = %flow, error = e, "activation failed to run; will retry");
                        self.retry_later(&myself, state, flow);
                    }
                    Ok(Outcome::UnknownType(_)) if state.leading => {
                        state.parked.insert(flow);
                    }
                    _ if again && state.leading => self.activate(&myself, state, flow),
                    _ => {}
                }
                self.pump(&myself, state);
            }
            ShardMsg::ScanRunning => self.scan_running(&myself, state),
            ShardMsg::ScanTimers => self.scan_timers(&myself, state),
            ShardMsg::TimerWake => {
                state.wake = None;
                self.fire_due(&myself, state);
            }
            ShardMsg::TimerFired { key, retry_at_ms } => {
                state.firing.remove(&key);
                if let (Some(at_ms), true) = (retry_at_ms, state.leading) {
                    state.timers.arm(key, at_ms);
                }
                self.fire_due(&myself, state);
            }
            ShardMsg::Delivered { target } => {
                let again = state.delivering.remove(&target).is_some_and(|(_, again)| again);
                if again && state.leading {
                    self.deliver(&myself, state, target);
                }
            }
            #[cfg(feature = "test-hooks")]
            ShardMsg::Panic => panic!("test hook: shard actor of {} panics", state.args.shard),
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

    /// Publishes the counters.
    fn publish(&self, state: &ShardState) {
        self.stats.live_flows.store(state.active.len(), Ordering::SeqCst);
        self.stats.queued_flows.store(state.queue.len(), Ordering::SeqCst);
        self.stats.timers_in_memory.store(state.timers.len() + state.firing.len(), Ordering::SeqCst);
    }

    fn stop_all(&self, state: &mut ShardState) {
        for (_, (flow_actor, _)) in state.active.drain() {
            flow_actor.stop(None);
        }
        state.queue.clear();
        state.parked.clear();
        state.claims.clear();
        state.running_pass = Pass::Idle;
        state.rescan = false;
        state.timers.clear();
        state.timer_pass = Pass::Idle;
        state.wake = None;
        state.firing.clear();
        state.delivering.clear();
        self.publish(state);
    }

    /// Derives all work from state again: a pass over the running index, a scan of the timer
    /// index, a delivery run for every target with pending outbox entries.
    fn rederive(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        state.running_pass = Pass::At { after: None, requested: false };
        state.rescan = false;
        state.next_timer_scan = tokio::time::Instant::now();
        state.timer_pass = Pass::Idle;
        self.maybe_scan_timers(myself, state);
        match state.args.group.read_local(shard::outbox_targets) {
            Ok(targets) => {
                for target in targets {
                    self.deliver(myself, state, target);
                }
            }
            Err(e) => {
                tracing::error!(group = %state.args.group.group(), error = %e, "cannot read the outbox")
            }
        }
        self.pump(myself, state);
    }

    fn on_action(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, action: Action) {
        match action {
            Action::Activate { flow } => {
                state.parked.remove(&flow);
                self.activate(myself, state, flow)
            }
            Action::Started { flow, epoch, by } => {
                state.parked.remove(&flow);
                if by == state.args.group.node_id() {
                    state.claims.insert(flow.clone(), epoch);
                }
                self.activate(myself, state, flow)
            }
            Action::Fence { flow } if crate::bugs::planted("epoch-check") => {
                // The planted bug (with the state machine's half, `fetter_raft::bugs`): the
                // superseded activation is forgotten but not stopped, and a new one starts
                // beside it; its steps, carrying the old epoch, are applied all the same.
                if state.active.remove(&flow).is_some() {
                    self.activate(myself, state, flow);
                }
            }
            Action::Fence { flow } => {
                // The running activation's steps are refused from now on; stop it early and run
                // the flow again if it is still runnable (restart, effect repair).
                if let Some((flow_actor, again)) = state.active.get_mut(&flow) {
                    flow_actor.stop(None);
                    *again = true;
                    let _ = myself.send_message(ShardMsg::Ended {
                        flow,
                        actor: flow_actor.get_id(),
                        outcome: Ok(Outcome::Fenced("fenced".into())),
                    });
                }
            }
            Action::ArmTimer { flow, timer_id, deadline_ms } => {
                self.arm(state, (flow, timer_id), deadline_ms)
            }
            // Running activations read new events themselves (and `Suspend` answers `Resume`).
            Action::EventAppended { .. } | Action::Finished { .. } => {}
            Action::DeliverOutbox { target } => self.deliver(myself, state, target),
        }
    }

    // --- activations ---

    /// Runs `flow` now if a slot is free, else queues it.
    fn activate(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, flow: FlowId) {
        if let Some((_, again)) = state.active.get_mut(&flow) {
            *again = true;
            return;
        }
        if state.active.len() >= state.args.tuning.max_activations {
            state.queue.push(flow);
            if state.queue.take_overflowed() {
                // Dropped from memory, not from state: the next pass over the index finds it.
                state.rescan = true;
            }
            self.publish(state);
            return;
        }
        self.spawn_flow(myself, state, flow);
    }

    fn spawn_flow(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, flow: FlowId) {
        let args = FlowArgs {
            group: state.args.group.clone(),
            registry: state.args.registry.clone(),
            flow: flow.clone(),
            shard: myself.clone(),
            limits: state.args.params.limits(),
            claimed: state.claims.remove(&flow),
        };
        match ractor::ActorRuntime::spawn_linked_instant(None, FlowActor, args, myself.get_cell()) {
            Ok((flow_actor, _)) => {
                state.active.insert(flow, (flow_actor, false));
            }
            Err(e) => {
                tracing::error!(flow = %flow, error = %e, "cannot spawn a flow actor; will retry");
                self.retry_later(myself, state, flow);
            }
        }
        self.publish(state);
    }

    /// Fills free slots from the queue, then asks for the next page of the running index while
    /// the queue has room for one (starting another pass if flows were dropped from the queue).
    fn pump(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        if !state.leading {
            return;
        }
        while state.active.len() < state.args.tuning.max_activations {
            let Some(flow) = state.queue.pop() else { break };
            if state.active.contains_key(&flow) {
                continue;
            }
            self.spawn_flow(myself, state, flow);
        }
        if matches!(state.running_pass, Pass::Idle) && state.rescan {
            state.rescan = false;
            state.running_pass = Pass::At { after: None, requested: false };
        }
        if let Pass::At { requested, .. } = &mut state.running_pass {
            if !*requested && state.queue.len() < state.args.tuning.page {
                *requested = true;
                let _ = myself.send_message(ShardMsg::ScanRunning);
            }
        }
        self.publish(state);
    }

    /// Reads one page of the running index into the queue.
    fn scan_running(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        let Pass::At { after, .. } = &state.running_pass else { return };
        if !state.leading {
            return;
        }
        let page = state.args.tuning.page;
        let rows = state.args.group.read_local(|kv| shard::running_flows_after(kv, after.as_ref(), page));
        match rows {
            Ok(flows) => {
                state.running_pass = match flows.last() {
                    Some(last) if flows.len() >= page => {
                        Pass::At { after: Some(last.clone()), requested: false }
                    }
                    _ => Pass::Idle,
                };
                for flow in flows {
                    let waiting = state.active.contains_key(&flow)
                        || state.queue.contains(&flow)
                        || state.parked.contains(&flow);
                    if !waiting {
                        state.queue.push(flow);
                    }
                }
                if state.queue.take_overflowed() {
                    state.rescan = true;
                }
            }
            Err(e) => {
                tracing::error!(group = %state.args.group.group(), error = %e, "cannot read the running flows");
                // Try the whole pass again later rather than lose flows.
                state.running_pass = Pass::Idle;
                state.rescan = true;
            }
        }
        self.pump(myself, state);
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

    // --- timers ---

    /// Holds a timer in memory if it is due within the horizon; one armed again with a deadline
    /// beyond the horizon leaves memory (the scan brings it back in time).
    fn arm(&self, state: &mut ShardState, key: TimerKey, deadline_ms: u64) {
        let horizon_ms = now_ms().saturating_add(state.args.tuning.timer_horizon.as_millis() as u64);
        if deadline_ms > horizon_ms {
            state.timers.remove(&key);
        } else if !state.firing.contains_key(&key) {
            state.timers.arm(key, deadline_ms);
        }
        self.publish(state);
    }

    /// Starts a scan of the timer index when one is due (periodically, or soon when the
    /// in-memory set had to drop timers and has room again).
    fn maybe_scan_timers(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        if !state.leading || !matches!(state.timer_pass, Pass::Idle) {
            return;
        }
        let now = tokio::time::Instant::now();
        let refill = state.timers.truncated() && state.timers.has_room();
        if now < state.next_timer_scan && !refill {
            return;
        }
        state.timers.clear_truncated();
        state.timer_pass_upto_ms =
            now_ms().saturating_add(state.args.tuning.timer_horizon.as_millis() as u64);
        state.timer_pass = Pass::At { after: None, requested: true };
        let _ = myself.send_message(ShardMsg::ScanTimers);
    }

    /// Reads one page of the timer index (up to the horizon) into memory.
    fn scan_timers(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        let Pass::At { after, .. } = &state.timer_pass else { return };
        if !state.leading {
            return;
        }
        let (page, upto_ms) = (state.args.tuning.page, state.timer_pass_upto_ms);
        let rows = state.args.group.read_local(|kv| shard::timers_after(kv, after.as_ref(), upto_ms, page));
        let mut done = true;
        match rows {
            Ok(timers) => {
                let full = timers.len() >= page;
                let last = timers.last().cloned();
                for (deadline_ms, flow, timer_id) in timers {
                    let key = (flow, timer_id);
                    if !state.firing.contains_key(&key) {
                        state.timers.arm(key, deadline_ms);
                    }
                }
                // Once memory is full, the rest waits for the next scan.
                if full && state.timers.has_room() {
                    state.timer_pass = Pass::At { after: last, requested: true };
                    let _ = myself.send_message(ShardMsg::ScanTimers);
                    done = false;
                }
            }
            Err(e) => {
                tracing::error!(group = %state.args.group.group(), error = %e, "cannot read the timer index");
            }
        }
        if done {
            state.timer_pass = Pass::Idle;
            let every =
                if state.timers.truncated() { TRUNCATED_RESCAN } else { state.args.tuning.timer_scan_every };
            state.next_timer_scan = tokio::time::Instant::now() + every;
        }
        self.publish(state);
        self.fire_due(myself, state);
    }

    /// Fires the due timers (a bounded number at once) and sleeps until the next one.
    fn fire_due(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        if !state.leading {
            return;
        }
        let room = state.args.tuning.max_firing.saturating_sub(state.firing.len());
        for key in state.timers.take_due(now_ms(), room) {
            self.fire(myself, state, key);
        }
        self.publish(state);
        self.schedule_wake(myself, state);
    }

    /// Keeps one task sleeping until the earliest held deadline (none while firing is at its
    /// bound: each proposal that ends fires more).
    fn schedule_wake(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState) {
        let earliest = state.timers.earliest();
        let at_bound = state.firing.len() >= state.args.tuning.max_firing;
        match (earliest, &state.wake) {
            (Some(deadline_ms), Some((armed_ms, _))) if *armed_ms == deadline_ms && !at_bound => {}
            (Some(deadline_ms), _) if !at_bound => {
                let me = myself.clone();
                let task = Task::spawn(async move {
                    tokio::time::sleep(until(deadline_ms)).await;
                    let _ = me.send_message(ShardMsg::TimerWake);
                });
                state.wake = Some((deadline_ms, task));
            }
            _ => state.wake = None,
        }
    }

    fn fire(&self, myself: &ActorRef<ShardMsg>, state: &mut ShardState, key: TimerKey) {
        let (group, me) = (state.args.group.clone(), myself.clone());
        let (flow, timer_id) = key.clone();
        let task = Task::spawn(async move {
            let fire = ShardCommand::FireTimer { flow: flow.clone(), timer_id: timer_id.clone() };
            let retry_at_ms = match group.propose_shard(fire).await {
                Ok(Ok(_)) => None,
                // The shard's clock (the proposers' clocks, made monotonic) is behind ours.
                Ok(Err(Rejection::TimerNotDue { deadline_ms })) => Some(deadline_ms.max(now_ms() + 10)),
                Ok(Err(r)) => {
                    tracing::debug!(flow = %flow, timer_id, rejection = %r, "timer not fired");
                    None
                }
                Err(e) => {
                    tracing::warn!(flow = %flow, timer_id, error = %e, "firing a timer failed; retrying");
                    Some(now_ms() + RETRY_AFTER.as_millis() as u64)
                }
            };
            let _ = me.send_message(ShardMsg::TimerFired { key: (flow, timer_id), retry_at_ms });
        });
        state.firing.insert(key, task);
    }
}

impl ShardActor {
    /// Proposes retention GC when it is due: finished flows older than the retention period are
    /// deleted. The cutoff is computed here and travels in the command (`apply` reads no clock).
    fn maybe_collect(&self, state: &mut ShardState) {
        let retention = state.args.params.retention();
        let every = state.args.gc_every.min(retention / 2).max(TICK);
        if !state.leading
            || state.last_gc.elapsed() < every
            || state.collecting.as_ref().is_some_and(|t| !t.is_finished())
        {
            return;
        }
        state.last_gc = tokio::time::Instant::now();
        let cutoff_ms = now_ms().saturating_sub(retention.as_millis() as u64);
        let group = state.args.group.clone();
        state.collecting = Some(Task::spawn(async move {
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
        let task = Task::spawn(async move {
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
            .read_local(|kv| shard::outbox_pending_within(kv, target, DELIVERY_BATCH, DELIVERY_BYTES))
            .map_err(|e| e.to_string())?;
        let (Some(&(first_seq, _)), Some(&(last_seq, _))) = (pending.first(), pending.last()) else {
            return Ok(());
        };
        let entries = pending.into_iter().map(|(_, e)| e).collect();
        let deliver = ShardCommand::OutboxDeliver { source, first_seq, entries };
        if crate::bugs::planted("outbox-ack-first") {
            // Planted: the entries are acknowledged before the target has them.
            let ack = ShardCommand::OutboxAck { target, upto_seq: last_seq };
            group.propose_shard(ack).await.map_err(|e| e.to_string())?.map_err(|r| r.to_string())?;
            let _ = target_group.submit_shard(deliver).await;
            continue;
        }
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
