//! The shard groups of a node and their shard actors, and giving up replicas that moved away.
//!
//! Every node has a Raft instance and a shard actor for every shard: for a shard it holds a
//! replica of, a member of the group; for the others an empty instance outside the group, which
//! routes calls to the shard's replicas (see the `view` module) and whose actor never leads.
//! When a replica moves away from this node (the placement no longer names the node and the
//! shard's leader has removed it), the node drops the group's log and state and opens an empty
//! instance in its place ([`drop_moved_replicas`]): disk use follows the placement.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fetter_actors::shard_actor::{Params, Router, ShardActor, ShardArgs, ShardHandle};
use fetter_actors::Registry;
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{GroupId, ShardId};
use fetter_raft::meta;
use tokio::sync::watch;

use super::Shared;

/// What a shard actor is started with, besides its group.
pub(crate) struct ActorConfig {
    pub(crate) registry: Registry,
    pub(crate) election_timeout: Duration,
    pub(crate) params: Params,
}

/// One shard on this node.
struct Slot {
    group: GroupHandle,
    actor: Option<ShardHandle>,
}

/// The shard groups of this node, by shard index; the router of its shard actors and control
/// panel.
pub(crate) struct Shards {
    slots: Vec<RwLock<Slot>>,
    /// Serializes replacements of a slot.
    replacing: Mutex<()>,
}

impl Shards {
    pub(crate) fn new(groups: Vec<GroupHandle>) -> Shards {
        Shards {
            slots: groups.into_iter().map(|group| RwLock::new(Slot { group, actor: None })).collect(),
            replacing: Mutex::new(()),
        }
    }

    /// The number of shards.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The group of shard `k` on this node.
    pub(crate) fn at(&self, k: usize) -> Option<GroupHandle> {
        self.slots.get(k).and_then(|s| s.read().ok().map(|s| s.group.clone()))
    }

    /// Every shard's group, by index.
    pub(crate) fn all(&self) -> Vec<GroupHandle> {
        self.slots.iter().filter_map(|s| s.read().ok().map(|s| s.group.clone())).collect()
    }

    /// Starts the shard actor of every shard (once, at the node's start).
    pub(crate) async fn start_actors(self: &Arc<Self>, config: &ActorConfig) -> Result<(), String> {
        for k in 0..self.len() {
            let group = self.at(k).ok_or("no such shard")?;
            let actor = start_actor(self, config, k, group).await?;
            if let Ok(mut slot) = self.slots[k].write() {
                slot.actor = Some(actor);
            }
        }
        Ok(())
    }

    /// Stops every shard actor.
    pub(crate) fn stop_actors(&self) {
        for slot in &self.slots {
            if let Ok(mut slot) = slot.write() {
                if let Some(actor) = slot.actor.take() {
                    actor.stop();
                }
            }
        }
    }
}

impl Router for Shards {
    fn group(&self, shard: ShardId) -> Option<GroupHandle> {
        self.at(shard.0 as usize)
    }
}

async fn start_actor(
    shards: &Arc<Shards>,
    config: &ActorConfig,
    k: usize,
    group: GroupHandle,
) -> Result<ShardHandle, String> {
    let shard = ShardId(k as u32);
    let router: Arc<dyn Router> = shards.clone();
    let mut args = ShardArgs::new(shard, group, router, config.registry.clone(), config.election_timeout);
    args.params = config.params.clone();
    let (actor, _) =
        ShardActor::start(args).await.map_err(|e| format!("cannot spawn the actor of shard {shard}: {e}"))?;
    Ok(actor)
}

/// Whether this node's replica of shard `k` has moved away: the placement does not name the
/// node, the replica holds state, and the shard's members as the best-informed report names
/// them (its leader's, at the highest term) do not include the node.
fn moved_away(shared: &Shared, k: usize, group: &GroupHandle) -> bool {
    let me = shared.node.id();
    let Ok(Some(info)) = shared.meta.read_local(meta::read_cluster) else { return false };
    let placed = info.placement.get(&ShardId(k as u32)).is_some_and(|p| p.replicas.contains(&me));
    if placed || group.status().borrow().last_applied.is_none() {
        return false;
    }
    if !group.is_replica() {
        // It applied its own removal.
        return true;
    }
    // It may never hear of its removal (the leader stops sending to a removed node): ask the
    // others' reports, from nodes that still are members.
    shared
        .liveness
        .hosted_reports()
        .into_iter()
        .filter(|(node, _)| *node != me)
        .flat_map(|(_, hosted)| hosted.into_iter().filter(|h| h.shard == k as u32 && h.leader.is_some()))
        .max_by_key(|h| h.term)
        .is_some_and(|h| !h.members.contains(&me.0))
}

/// Drops the replicas that moved away from this node and opens an empty instance of each in its
/// place (with a new shard actor). Returns how many it dropped.
pub(crate) async fn drop_moved_replicas(shared: &Arc<Shared>, config: &ActorConfig) -> usize {
    let mut dropped = 0;
    for k in 0..shared.shards.len() {
        let Some(group) = shared.shards.at(k) else { continue };
        if !moved_away(shared, k, &group) {
            continue;
        }
        match replace(shared, config, k).await {
            Ok(()) => dropped += 1,
            Err(e) => tracing::warn!(shard = k, error = %e, "could not drop a replica that moved away"),
        }
    }
    dropped
}

async fn replace(shared: &Arc<Shared>, config: &ActorConfig, k: usize) -> Result<(), String> {
    let shards = &shared.shards;
    let gid = GroupId::of_shard(ShardId(k as u32));
    let old_actor = {
        let _one = shards.replacing.lock().map_err(|_| "poisoned")?;
        shards.slots[k].write().map_err(|_| "poisoned")?.actor.take()
    };
    if let Some(actor) = old_actor {
        actor.stop();
    }
    shared.node.drop_group(gid).await.map_err(|e| e.to_string())?;
    let group = shared.node.open_group(gid).await.map_err(|e| e.to_string())?;
    super::view::set_routes_of(shared, k, &group);
    let actor = start_actor(shards, config, k, group.clone()).await?;
    if let Ok(mut slot) = shards.slots[k].write() {
        *slot = Slot { group, actor: Some(actor) };
    }
    tracing::info!(shard = k, "dropped this node's replica of the shard: it moved to other nodes");
    Ok(())
}

/// Every second until `stop`: drops the replicas that moved away.
pub(crate) async fn janitor(shared: Arc<Shared>, config: Arc<ActorConfig>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        drop_moved_replicas(&shared, &config).await;
    }
}
