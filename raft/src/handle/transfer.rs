//! Leadership transfer (openraft 0.9 has no `transfer_leader`).
//!
//! A follower's vote is refused while its leader lease is fresh, but a leader's own lease is only
//! set when it is established: once it has led for longer than the lease (the election timeout
//! maximum), it grants the vote of a candidate whose log is as long as its own, and steps down.
//! So the leader stops taking proposals, waits until the target has every entry it has, and asks
//! the target to stand for election: the target wins with its own vote and the old leader's,
//! within a round trip — no election timeout passes.

use std::time::Duration;

use tokio::time::Instant;

use super::{Error, GroupHandle};
use crate::ids::NodeId;
use crate::transport::proto::RpcKind;

/// How long steps already proposed (at-least-once results, the end of a flow) get to commit on
/// the old leader once no new work starts, also when no at-most-once work is in flight.
const MIN_DRAIN: Duration = Duration::from_millis(150);
/// How long the target may take to catch up with the leader's log before the handover is
/// given up (proposals are refused meanwhile).
const CATCH_UP: Duration = Duration::from_millis(500);
/// How long one election of the target may take before it stands again.
const ELECTION_ROUND: Duration = Duration::from_millis(500);

/// Ends a handover: the group takes proposals again.
struct Reopen<'a>(&'a GroupHandle);

impl Drop for Reopen<'_> {
    fn drop(&mut self) {
        self.0.inner.handover_closed.store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.inner.handing_over.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

impl GroupHandle {
    /// Hands leadership of this group from this node (its leader) to the voter `to`, within
    /// `timeout` plus the hand-over drain. `lease` is the election timeout maximum (the
    /// followers' leader lease). New activations and at-most-once work are refused from the
    /// start; the at-most-once work in flight may finish and commit (bounded by the drain); then
    /// every proposal made here is answered "not leader, ask `to`".
    pub async fn transfer_leadership(
        &self,
        to: NodeId,
        lease: Duration,
        timeout: Duration,
    ) -> Result<(), Error> {
        let group = self.inner.group;
        let me = self.inner.peers.identity().node_id;
        let status = self.status().borrow().clone();
        if !status.is_leader {
            return Err(Error::NotLeader { group, leader: status.leader, leader_addr: None });
        }
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if to == me || !membership.voter_ids().any(|v| v == to.0) {
            return Err(Error::Unavailable {
                group,
                reason: format!("node {to} is not another voter of {group}"),
            });
        }
        let addr = membership
            .get_node(&to.0)
            .map(|n| n.addr.clone())
            .ok_or_else(|| Error::Unavailable { group, reason: format!("no address for node {to}") })?;
        let deadline = Instant::now() + timeout;
        // A leader established less than a lease ago would still refuse the vote.
        let led_for = status.leading_since.map_or(Duration::ZERO, |since| since.elapsed());
        let wait = (lease + Duration::from_millis(50)).saturating_sub(led_for);
        tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
        self.inner.handing_over.store(to.0, std::sync::atomic::Ordering::SeqCst);
        // Proposals are taken again when this ends in any way — also when the caller drops this
        // future (a remote caller that gave up cancels the RPC handler running it).
        let _reopen = Reopen(self);
        // No new activation or at-most-once work starts from here on; the at-most-once work in
        // flight finishes and commits its outcome here first (bounded by the drain), or its
        // outcome would be unknown to the next leader. The drain does not count against
        // `timeout`: the hand-over itself still gets all of it.
        let drain_started = Instant::now();
        tokio::time::sleep(MIN_DRAIN.min(deadline.saturating_duration_since(Instant::now()))).await;
        let mut in_flight = self.inner.at_most_once.subscribe();
        if tokio::time::timeout(self.inner.handover_drain, in_flight.wait_for(|n| *n == 0)).await.is_err() {
            tracing::warn!(
                group = %group,
                in_flight = *in_flight.borrow(),
                drain = ?self.inner.handover_drain,
                "at-most-once work still in flight after the hand-over drain; moving anyway"
            );
        }
        let deadline = deadline + drain_started.elapsed();
        self.inner.handover_closed.store(true, std::sync::atomic::Ordering::SeqCst);
        self.hand_over(me, to, &addr, deadline).await
    }

    async fn hand_over(&self, me: NodeId, to: NodeId, addr: &str, deadline: Instant) -> Result<(), Error> {
        let group = self.inner.group;
        // The target must hold every entry this leader has, or the leader refuses its vote.
        // Proposals wait meanwhile, so a target that does not catch up soon (gone, stopping,
        // far behind) is given up on quickly; a later move can try again.
        let catch_up_by = deadline.min(Instant::now() + CATCH_UP);
        loop {
            let m = self.inner.raft.metrics().borrow().clone();
            if m.current_leader != Some(me.0) {
                return Ok(());
            }
            let matched =
                m.replication.as_ref().and_then(|r| r.get(&to.0).cloned()).flatten().map(|l| l.index);
            if matched >= m.last_log_index {
                break;
            }
            if Instant::now() >= catch_up_by {
                return Err(Error::Unavailable { group, reason: format!("node {to} did not catch up") });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // A vote can still be refused (a voter whose lease was refreshed late): stand again.
        loop {
            let bytes = self.call(addr, RpcKind::Elect, Vec::new(), deadline).await?;
            let elected: Result<(), Error> = crate::codec::decode(&bytes)
                .map_err(|e| Error::Internal { group, reason: format!("undecodable election reply: {e}") })?;
            elected?;
            let round = ELECTION_ROUND.min(deadline.saturating_duration_since(Instant::now()));
            let waited = self
                .inner
                .raft
                .wait(Some(round))
                .metrics(|m| m.current_leader == Some(to.0), "handover")
                .await;
            if waited.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable {
                    group,
                    reason: format!("node {to} was not elected in time"),
                });
            }
        }
    }

    /// Moves leadership of this group to the voter `to`, from whichever node leads it (asked
    /// over the transport when another node does).
    pub async fn move_leadership(&self, to: NodeId, lease: Duration, timeout: Duration) -> Result<(), Error> {
        let group = self.inner.group;
        if self.status().borrow().leader == Some(to) {
            return Ok(());
        }
        let payload = crate::codec::encode(&to)
            .map_err(|e| Error::Internal { group, reason: format!("cannot encode node id: {e}") })?;
        // The leader may first wait for at-most-once work in flight (the hand-over drain).
        let call_deadline = Instant::now() + timeout + self.inner.handover_drain;
        let payload = &payload;
        self.via_leader(Instant::now() + timeout, |remote| async move {
            match remote {
                None => self.transfer_leadership(to, lease, timeout).await,
                Some((_, addr)) => {
                    let bytes =
                        self.call(&addr, RpcKind::TransferLeader, payload.clone(), call_deadline).await?;
                    crate::codec::decode::<Result<(), Error>>(&bytes).map_err(|e| Error::Internal {
                        group,
                        reason: format!("undecodable transfer reply: {e}"),
                    })?
                }
            }
        })
        .await
    }

    /// Stands for election now (asked by the leader handing over).
    pub(crate) async fn elect_here(&self) -> Result<(), Error> {
        self.inner.raft.trigger().elect().await.map_err(|_| Error::ShuttingDown(self.inner.group))
    }

    /// Proposals are refused while this leader hands over: the node it hands over to, if any.
    pub(crate) fn handing_over_to(&self) -> Option<NodeId> {
        match self.inner.handing_over.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            n => Some(NodeId(n)),
        }
    }
}
