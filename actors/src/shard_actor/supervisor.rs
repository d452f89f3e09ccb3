//! The supervisor of a shard actor: a shard actor that fails (a bug: a panic in its handler, an
//! error it returns) is replaced at once by a new one with the same arguments, which derives its
//! work from the shard's state again. Without it, a dead shard actor would leave its shard
//! without anyone running flows, timers or deliveries on this node while it still leads.
//!
//! The failed actor's flow actors are linked to it, so ractor kills them with it, and its
//! background tasks are aborted with its state: the replacement starts alone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::{ShardActor, ShardArgs, ShardMsg, ShardStats};

/// Delay before another try when a replacement could not be spawned.
const RESPAWN_RETRY: Duration = Duration::from_millis(100);

/// Messages of the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Spawn the shard actor (again).
    Spawn,
}

/// The shard actor currently running, shared with the handle.
pub(super) type Current = Arc<Mutex<Option<ActorRef<ShardMsg>>>>;

pub(super) struct Supervisor {
    pub(super) stats: ShardStats,
    pub(super) current: Current,
}

pub(super) struct SupervisorState {
    args: ShardArgs,
    child: Option<ActorRef<ShardMsg>>,
}

impl Supervisor {
    async fn spawn_child(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ractor::SpawnErr> {
        let actor = ShardActor { stats: self.stats.clone() };
        let (child, _) = Actor::spawn_linked(None, actor, state.args.clone(), myself.get_cell()).await?;
        if let Ok(mut current) = self.current.lock() {
            *current = Some(child.clone());
        }
        state.child = Some(child);
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: ShardArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState { args, child: None };
        self.spawn_child(&myself, &mut state).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn if state.child.is_none() => {
                if let Err(e) = self.spawn_child(&myself, state).await {
                    tracing::error!(shard = %state.args.shard, error = %e, "cannot respawn the shard actor; retrying");
                    myself.send_after(RESPAWN_RETRY, || SupervisorMsg::Spawn);
                }
            }
            SupervisorMsg::Spawn => {}
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let is_child = |who: &ractor::ActorCell| {
            state.child.as_ref().is_some_and(|child| child.get_id() == who.get_id())
        };
        match event {
            SupervisionEvent::ActorFailed(who, reason) if is_child(&who) => {
                tracing::error!(shard = %state.args.shard, %reason, "the shard actor failed; starting a new one");
                state.child = None;
                // The replacement publishes its own (empty) counters as it starts.
                self.stats.restarts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = myself.send_message(SupervisorMsg::Spawn);
            }
            // Stopped on purpose (the node stops): the supervisor stops with it.
            SupervisionEvent::ActorTerminated(who, _, _) if is_child(&who) => {
                state.child = None;
                myself.stop(None);
            }
            _ => {}
        }
        Ok(())
    }
}
