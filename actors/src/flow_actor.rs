//! The `FlowActor`: one per active flow instance on a shard leader. It drives one activation —
//! replaying the flow from its journal and running new steps with its epoch — and reports to
//! the shard actor how it ended. Stopping it (leadership lost, fenced) drops the flow's future
//! mid-step; it never resumes. A flow that waits has no actor.

use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::FlowId;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::activation;
use crate::registry::Registry;
use crate::shard_actor::ShardMsg;
use crate::task::Task;

/// What a flow actor runs.
pub(crate) struct FlowArgs {
    pub(crate) group: GroupHandle,
    pub(crate) registry: Registry,
    pub(crate) flow: FlowId,
    pub(crate) shard: ActorRef<ShardMsg>,
    pub(crate) limits: activation::Limits,
    /// The epoch committed with the flow's start and claimed by this node, if any: run it
    /// without an `Activate` of its own.
    pub(crate) claimed: Option<fetter_raft::ids::Epoch>,
}

/// The actor of one flow's activation. It takes no messages: it runs until its activation ends
/// (then stops itself) or it is stopped or killed; its activation task goes with its state.
pub(crate) struct FlowActor;

impl Actor for FlowActor {
    type Msg = ();
    type State = Task;
    type Arguments = FlowArgs;

    async fn pre_start(&self, myself: ActorRef<()>, args: FlowArgs) -> Result<Task, ActorProcessingErr> {
        Ok(Task::spawn(async move {
            let FlowArgs { group, registry, flow, shard, limits, claimed } = args;
            let outcome = match claimed {
                Some(epoch) => activation::run_claimed(&group, &registry, &flow, epoch, limits).await,
                None => activation::activate_with(&group, &registry, &flow, limits).await,
            }
            .map_err(|e| e.to_string());
            // The shard actor matches the actor's identity: a report of an activation it already
            // replaced is ignored.
            let _ = shard.send_message(ShardMsg::Ended { flow, actor: myself.get_id(), outcome });
            myself.stop(None);
        }))
    }
}
