//! The handle of one Raft group on this node: propose with group commit, read, watch, reconfigure.
//!
//! openraft 0.9 writes one log entry per `client_write`, so group commit is done here: proposals
//! queue in a bounded channel, and a batcher packs whatever is waiting into one entry
//! ([`Request`]), keeping a bounded number of entries in flight. Under load one entry (and one
//! fsync, shared with the other groups by the flusher) carries many commands.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::codec;
use crate::ids::{GroupId, NodeId};
use crate::kv::KvRead;
use crate::meta::{MetaCommand, MetaReply};
use crate::shard::{Action, ShardCommand, ShardReply};
use crate::storage::StateReader;
use crate::sync::now_ms;
use crate::transport::Peers;
use crate::types::{Command, Raft, Reply, Request};

mod membership;
mod route;
mod transfer;

pub use membership::MembershipOp;

/// Bound on proposals waiting to be packed, per group.
const QUEUE_CAPACITY: usize = 8192;
/// Bound on commands packed into one log entry.
const MAX_COMMANDS_PER_ENTRY: usize = 1024;
/// Bound on proposals taken from the queue while they wait for an entry with room for them
/// (smaller ones behind them may go first).
const MAX_WAITING_PROPOSALS: usize = 1024;
/// Bound on the encoded commands packed into one log entry. An entry travels whole in one
/// AppendEntries, which must reach the follower and be written there within openraft's RPC
/// timeout (the heartbeat interval); many small entries replicate, a huge one would not. A
/// proposal larger than this goes alone in an entry of its own.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// Bound on the encoded commands of a group's large proposals from when they are queued until
/// their entry is committed or given up: a proposer waits for room (as for a place in the
/// queue), so large proposals cannot pile up in memory faster than they replicate.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// Proposals up to this size take no room in [`MAX_QUEUED_BYTES`] (the queue's count bounds
/// them): room is given out in order, and a small command must not wait behind large ones.
const SMALL_PROPOSAL_BYTES: usize = 64 * 1024;
/// Bound on the encoded commands of one proposal: its entry must fit, whole, into one transport
/// message with room to spare ([`crate::transport::MAX_MESSAGE_BYTES`]).
pub const MAX_PROPOSAL_BYTES: usize = 16 * 1024 * 1024;
/// Bound on entries proposed but not yet committed, per group. One: while an entry is being
/// committed, everything proposed meanwhile queues and goes into the next entry. Measured with
/// `journal_bench` (3 nodes, 64 proposers): 1 gave ~4,100–4,800 commits/s, 2 and 4 ~3,000–3,300,
/// because every extra entry costs a full round of replication, fsync and apply.
const MAX_ENTRIES_IN_FLIGHT: usize = 1;

/// Pause between two leadership rounds of [`GroupHandle::confirm_leadership`].
const CONFIRM_PAUSE: Duration = Duration::from_millis(10);

/// Why a proposal or read did not produce a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// This node does not lead the group; `leader` is the hint, if known.
    #[error("not the leader of {group} (leader: {leader:?})")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader this node knows of.
        leader: Option<NodeId>,
        /// Its address.
        leader_addr: Option<String>,
    },
    /// No outcome within the time budget: the command may or may not commit.
    #[error("proposal to {0} timed out; its outcome is unknown")]
    Timeout(GroupId),
    /// A quorum could not be reached or the membership change is not allowed now.
    #[error("group {group} unavailable: {reason}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// The group is shutting down or its Raft stopped.
    #[error("group {0} is shutting down")]
    ShuttingDown(GroupId),
    /// No leader could be reached within the time budget (an election, lost nodes).
    #[error("group {group} has no reachable leader: {reason}")]
    NoLeader {
        /// The group.
        group: GroupId,
        /// What was tried last.
        reason: String,
    },
    /// The commands are too large to be replicated as one log entry.
    #[error("proposal to {group} of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The group.
        group: GroupId,
        /// The encoded size of the proposal's commands.
        bytes: u64,
        /// [`MAX_PROPOSAL_BYTES`].
        limit: u64,
    },
    /// This node holds no replica of the group (it is not in the group's membership): its
    /// state cannot be read here. Ask a node that hosts the group.
    #[error("{0} has no replica on this node")]
    NotHosted(GroupId),
    /// The reply did not match the command (a bug: the state machine broke its contract).
    #[error("internal error in {group}: {reason}")]
    Internal {
        /// The group.
        group: GroupId,
        /// What went wrong.
        reason: String,
    },
}

/// Leadership as this node sees it, for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// The current term.
    pub term: u64,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// When a quorum last acknowledged this node as leader (only while leading).
    pub quorum_acked_at: Option<Instant>,
    /// Index of the last applied entry.
    pub last_applied: Option<u64>,
    /// Since when this node leads (in its current term), while it leads.
    pub leading_since: Option<Instant>,
}

impl GroupStatus {
    /// Time since a quorum last acknowledged this leader; `None` if not leading or never acked.
    /// A leader that has had no quorum acknowledgement for longer than the election timeout may
    /// have been replaced (openraft 0.9 has no check-quorum) and must stop acting.
    pub fn since_quorum_ack(&self) -> Option<Duration> {
        self.quorum_acked_at.map(|t| t.elapsed())
    }
}

/// Commands that go into the same log entry, in order, and their replies.
struct Proposal {
    commands: Vec<Command>,
    /// The encoded size of `commands`.
    bytes: usize,
    /// Its share of `MAX_QUEUED_BYTES` (none if small), given back when its entry is done.
    room: Option<OwnedSemaphorePermit>,
    reply: oneshot::Sender<Result<Vec<Reply>, Error>>,
}

/// At-most-once work in flight ([`GroupHandle::at_most_once_in_flight`]); dropping it ends it.
#[must_use = "the work counts as in flight only while the guard lives"]
pub struct InFlight(watch::Sender<usize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The handle of one group. Cheap to clone.
#[derive(Clone)]
pub struct GroupHandle {
    inner: Arc<Inner>,
}

struct Inner {
    group: GroupId,
    raft: Raft,
    reader: StateReader,
    proposals: mpsc::Sender<Proposal>,
    /// Room for queued proposals' bytes ([`MAX_QUEUED_BYTES`]).
    queued_bytes: Arc<Semaphore>,
    status: watch::Receiver<GroupStatus>,
    actions: broadcast::Sender<Arc<Vec<Action>>>,
    peers: Peers,
    propose_timeout: Duration,
    /// Bound on a hand-over's wait for the at-most-once work in flight.
    handover_drain: Duration,
    /// At-most-once work in flight on this node (from its `Started` proposal until its outcome
    /// is committed or the activation ends): a hand-over waits for it to reach 0.
    at_most_once: watch::Sender<usize>,
    /// While handing leadership over: the target's node id (0: not handing over).
    handing_over: std::sync::atomic::AtomicU64,
    /// While handing over: every proposal is refused (before: only new work is).
    handover_closed: std::sync::atomic::AtomicBool,
    /// Held while this node carries out a membership change (one at a time).
    membership_changes: tokio::sync::Mutex<()>,
    /// Proposals and read-index requests this node sent to another node's leader.
    forwarded: std::sync::atomic::AtomicU64,
    /// Where to send proposals while this node is not a member of the group (it knows no
    /// leader then): see [`GroupHandle::set_routes`].
    routes: std::sync::RwLock<Option<Routes>>,
    /// Turns through [`Inner::routes`], so that a dead or stale route is not tried forever.
    next_route: std::sync::atomic::AtomicUsize,
}

/// The nodes (id and address) believed to host a group, for a node that hosts none of it.
pub type Routes = Arc<dyn Fn() -> Vec<(NodeId, String)> + Send + Sync>;

impl GroupHandle {
    /// Starts the batcher and the status watch of `raft`. `propose_timeout` bounds every proposal.
    pub(crate) fn start(
        group: GroupId,
        raft: Raft,
        reader: StateReader,
        actions: broadcast::Sender<Arc<Vec<Action>>>,
        peers: Peers,
        propose_timeout: Duration,
        handover_drain: Duration,
    ) -> GroupHandle {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(batcher(group, raft.clone(), rx, propose_timeout));
        let status = spawn_status_watch(raft.clone());
        GroupHandle {
            inner: Arc::new(Inner {
                group,
                raft,
                reader,
                proposals: tx,
                queued_bytes: Arc::new(Semaphore::new(MAX_QUEUED_BYTES)),
                status,
                actions,
                peers,
                propose_timeout,
                handover_drain,
                at_most_once: watch::Sender::new(0),
                handing_over: std::sync::atomic::AtomicU64::new(0),
                handover_closed: std::sync::atomic::AtomicBool::new(false),
                forwarded: std::sync::atomic::AtomicU64::new(0),
                membership_changes: tokio::sync::Mutex::new(()),
                routes: std::sync::RwLock::new(None),
                next_route: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.inner.group
    }

    /// How many proposals and read-index requests this node has forwarded to the group's leader
    /// on another node (calls that reached a node which does not lead the group).
    pub fn forwarded(&self) -> u64 {
        self.inner.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The underlying openraft instance.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Proposes `command` on this node; returns its reply once the entry carrying it is committed
    /// and applied. A node that does not lead the group answers [`Error::NotLeader`]: activations
    /// use this, so a deposed leader's flows never commit through another node
    /// ([`GroupHandle::submit`] forwards).
    pub async fn propose(&self, command: Command) -> Result<Reply, Error> {
        let mut replies = self.propose_all(vec![command]).await?;
        replies.pop().ok_or_else(|| Error::Internal {
            group: self.inner.group,
            reason: "no reply for a proposed command".to_string(),
        })
    }

    /// Proposes `commands` on this node in one log entry (they commit together or not at all,
    /// and apply in order); returns one reply per command. Same rules as [`GroupHandle::propose`].
    pub async fn propose_all(&self, commands: Vec<Command>) -> Result<Vec<Reply>, Error> {
        let (reply, rx) = oneshot::channel();
        let group = self.inner.group;
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(to) = self.handing_over_to() {
            // First new work stops (an activation, the start of an at-most-once effect), so the
            // steps in flight can still finish here; then everything.
            let new_work = commands.iter().any(|c| {
                matches!(
                    c,
                    Command::Shard(ShardCommand::Activate { .. } | ShardCommand::EffectStarted { .. })
                )
            });
            if new_work || self.inner.handover_closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::NotLeader { group, leader: Some(to), leader_addr: self.addr_of(to) });
            }
        }
        // Measured here, in the proposer's task, so the batcher only adds numbers.
        let bytes = codec::encoded_len(&commands)
            .map_err(|e| Error::Internal { group, reason: format!("cannot encode the proposal: {e}") })?;
        if bytes > MAX_PROPOSAL_BYTES {
            return Err(Error::TooLarge { group, bytes: bytes as u64, limit: MAX_PROPOSAL_BYTES as u64 });
        }
        let room = if bytes > SMALL_PROPOSAL_BYTES {
            // At most MAX_PROPOSAL_BYTES (checked above), far below u32::MAX.
            let room = Arc::clone(&self.inner.queued_bytes)
                .acquire_many_owned(bytes as u32)
                .await
                .map_err(|_| Error::ShuttingDown(group))?;
            Some(room)
        } else {
            None
        };
        self.inner
            .proposals
            .send(Proposal { commands, bytes, room, reply })
            .await
            .map_err(|_| Error::ShuttingDown(group))?;
        rx.await.map_err(|_| Error::ShuttingDown(group))?
    }

    /// Proposes shard commands in one log entry ([`GroupHandle::propose_all`]) and returns the
    /// shard's replies.
    pub async fn propose_shard_all(&self, commands: Vec<ShardCommand>) -> Result<Vec<ShardReply>, Error> {
        let replies = self.propose_all(commands.into_iter().map(Command::Shard).collect()).await?;
        replies.into_iter().map(|r| self.shard_reply(r)).collect()
    }

    /// Proposes a shard command and returns the shard's reply.
    pub async fn propose_shard(&self, command: ShardCommand) -> Result<ShardReply, Error> {
        self.shard_reply(self.propose(Command::Shard(command)).await?)
    }

    /// Proposes a metadata command and returns group 0's reply.
    pub async fn propose_meta(&self, command: MetaCommand) -> Result<MetaReply, Error> {
        self.meta_reply(self.propose(Command::Meta(command)).await?)
    }

    /// The shard's reply in `reply`; any other kind is a broken contract of the state machine.
    fn shard_reply(&self, reply: Reply) -> Result<ShardReply, Error> {
        match reply {
            Reply::Shard(r) => Ok(r),
            other => Err(Error::Internal {
                group: self.inner.group,
                reason: format!("shard command answered with {other:?}"),
            }),
        }
    }

    /// Group 0's reply in `reply` (see [`GroupHandle::shard_reply`]).
    fn meta_reply(&self, reply: Reply) -> Result<MetaReply, Error> {
        match reply {
            Reply::Meta(r) => Ok(r),
            other => Err(Error::Internal {
                group: self.inner.group,
                reason: format!("metadata command answered with {other:?}"),
            }),
        }
    }

    /// A linearizable read on any replica: the leader confirms its leadership with a quorum and
    /// names the last committed index (asked over the transport when another node leads); once
    /// this replica has applied that far, `f` runs over its state. [`Error::NotHosted`] on a
    /// node that holds no replica.
    pub async fn read<R>(&self, f: impl FnOnce(&dyn KvRead) -> R) -> Result<R, Error> {
        if !self.is_replica() {
            return Err(Error::NotHosted(self.inner.group));
        }
        self.read_barrier().await?;
        Ok(self.inner.reader.read(f))
    }

    /// Confirms leadership with a quorum (leader only) and returns the index a replica must have
    /// applied to see everything committed before now.
    pub(crate) async fn read_index_here(&self) -> Result<Option<u64>, Error> {
        let group = self.inner.group;
        let (read_log_id, _) = self.inner.raft.get_read_log_id().await.map_err(|e| match e {
            RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                Error::NotLeader {
                    group,
                    leader: f.leader_id.map(NodeId),
                    leader_addr: f.leader_node.map(|n| n.addr),
                }
            }
            RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(q)) => {
                Error::Unavailable { group, reason: q.to_string() }
            }
            RaftError::Fatal(_) => Error::ShuttingDown(group),
        })?;
        Ok(read_log_id.map(|l| l.index))
    }

    /// Confirms with a quorum, now, that this node still leads the group (a heartbeat round);
    /// refused while it hands leadership over. A leader that was frozen and replaced learns it
    /// here instead of acting on a stale belief.
    ///
    /// openraft bounds each round by the heartbeat interval, so on a loaded node a round can
    /// miss its quorum while nothing is wrong. Such a round is repeated (a later round that
    /// succeeds proves leadership just as well) until the proposal timeout; a definite answer
    /// (another leader, shutting down, handing over) ends it at once.
    pub async fn confirm_leadership(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.inner.propose_timeout;
        loop {
            if let Some(to) = self
                .handing_over_to()
                .filter(|_| self.inner.handover_closed.load(std::sync::atomic::Ordering::SeqCst))
            {
                return Err(Error::NotLeader {
                    group: self.inner.group,
                    leader: Some(to),
                    leader_addr: None,
                });
            }
            match self.read_index_here().await {
                Ok(_) => return Ok(()),
                Err(Error::Unavailable { reason, .. }) if Instant::now() < deadline => {
                    tracing::debug!(group = %self.inner.group, %reason, "leadership round without quorum; again");
                    tokio::time::sleep(CONFIRM_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks at-most-once work in flight on this node until the returned guard is dropped. Take
    /// it before proposing the work's `Started` and drop it once its outcome is committed (or the
    /// activation ends): a planned hand-over of the group waits for every such guard, bounded by
    /// the hand-over drain, so that a leadership move never leaves an outcome unknown.
    pub fn at_most_once_in_flight(&self) -> InFlight {
        self.inner.at_most_once.send_modify(|n| *n += 1);
        InFlight(self.inner.at_most_once.clone())
    }

    /// A digest of this replica's applied state (see [`crate::storage::StateReader::digest`]).
    pub fn state_digest(&self) -> Result<crate::storage::StateDigest, Error> {
        self.inner
            .reader
            .digest()
            .map_err(|e| Error::Internal { group: self.inner.group, reason: e.to_string() })
    }

    /// A read of this replica's applied state, possibly stale.
    pub fn read_local<R>(&self, f: impl FnOnce(&dyn KvRead) -> R) -> R {
        self.inner.reader.read(f)
    }

    /// Leadership as this node sees it; changes are signalled on the receiver.
    pub fn status(&self) -> watch::Receiver<GroupStatus> {
        self.inner.status.clone()
    }

    /// Actions emitted by applied commands of this group (every replica; the leader acts).
    /// A receiver that lags must re-derive its work from state (the running and timer indexes, the outbox).
    pub fn subscribe_actions(&self) -> broadcast::Receiver<Arc<Vec<Action>>> {
        self.inner.actions.subscribe()
    }

    /// Creates the group with `members` as its first voters. Only one node calls this, once;
    /// calling it on a group that already has state is a no-op.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), Error> {
        // A restarted group already has its membership (openraft would log an error).
        if self.inner.raft.is_initialized().await.map_err(|_| Error::ShuttingDown(self.inner.group))? {
            return Ok(());
        }
        let nodes: BTreeMap<u64, BasicNode> =
            members.into_iter().map(|(id, addr)| (id.0, BasicNode { addr })).collect();
        match self.inner.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(Error::Unavailable { group: self.inner.group, reason: e.to_string() }),
        }
    }

    /// Adds `node` as a learner and waits until it has caught up with the leader's log.
    pub async fn add_learner(&self, node: NodeId, addr: String) -> Result<(), Error> {
        self.inner
            .raft
            .add_learner(node.0, BasicNode { addr }, true)
            .await
            .map(|_| ())
            .map_err(|e| self.write_error(e))
    }

    /// Makes `voters` the group's voting members (learners not listed stay learners when
    /// `retain` is true).
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>, retain: bool) -> Result<(), Error> {
        let ids: BTreeSet<u64> = voters.into_iter().map(|n| n.0).collect();
        self.inner.raft.change_membership(ids, retain).await.map(|_| ()).map_err(|e| self.write_error(e))
    }

    fn write_error(&self, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Error {
        write_error(self.inner.group, e)
    }
}

fn write_error(group: GroupId, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
            group,
            leader: f.leader_id.map(NodeId),
            leader_addr: f.leader_node.map(|n| n.addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            Error::Unavailable { group, reason: c.to_string() }
        }
        RaftError::Fatal(_) => Error::ShuttingDown(group),
    }
}

/// Packs waiting proposals into entries; at most `MAX_ENTRIES_IN_FLIGHT` entries uncommitted.
///
/// An entry takes the oldest waiting proposal, then every later one that still fits (at most
/// `MAX_COMMANDS_PER_ENTRY` commands and `MAX_ENTRY_BYTES` of them; a proposal is never split,
/// its commands commit together). A proposal that does not fit waits for the next entry, and a
/// smaller one behind it may go first: proposals waiting together are concurrent, none was
/// promised an order, and a small command must not wait for every large one queued before it.
async fn batcher(group: GroupId, raft: Raft, mut rx: mpsc::Receiver<Proposal>, timeout: Duration) {
    let in_flight = Arc::new(Semaphore::new(MAX_ENTRIES_IN_FLIGHT));
    // Proposals taken from the queue that did not fit into an entry yet, oldest first.
    let mut waiting: VecDeque<Proposal> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(p) => waiting.push_back(p),
                None => break,
            }
        }
        // Waiting for a slot lets more proposals queue up: the batch grows with the load.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        while waiting.len() < MAX_WAITING_PROPOSALS {
            match rx.try_recv() {
                Ok(p) => waiting.push_back(p),
                Err(_) => break,
            }
        }
        let mut commands = Vec::new();
        let mut waiters = Vec::new();
        let mut bytes = 0usize;
        let mut later = VecDeque::new();
        let mut rooms = Vec::new();
        for p in waiting.drain(..) {
            let fits = commands.is_empty()
                || (bytes + p.bytes <= MAX_ENTRY_BYTES
                    && commands.len() + p.commands.len() <= MAX_COMMANDS_PER_ENTRY);
            if fits {
                bytes += p.bytes;
                rooms.push(p.room);
                waiters.push((p.commands.len(), p.reply));
                commands.extend(p.commands);
            } else {
                later.push_back(p);
            }
        }
        waiting = later;
        let raft = raft.clone();
        tokio::spawn(async move {
            let count = commands.len();
            let request = Request { now_ms: now_ms(), commands };
            let outcome = tokio::time::timeout(timeout, raft.client_write(request)).await;
            drop(permit);
            drop(rooms);
            match outcome {
                Ok(Ok(resp)) if resp.data.replies.len() == count => {
                    let mut replies = resp.data.replies.into_iter();
                    for (n, w) in waiters {
                        let _ = w.send(Ok(replies.by_ref().take(n).collect()));
                    }
                }
                Ok(Ok(resp)) => {
                    let e = Error::Internal {
                        group,
                        reason: format!("{} replies for {count} commands", resp.data.replies.len()),
                    };
                    for (_, w) in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
                Ok(Err(e)) => {
                    let e = write_error(group, e);
                    for (_, w) in waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
                Err(_) => {
                    for (_, w) in waiters {
                        let _ = w.send(Err(Error::Timeout(group)));
                    }
                }
            }
        });
    }
}

fn spawn_status_watch(raft: Raft) -> watch::Receiver<GroupStatus> {
    let mut metrics = raft.metrics();
    let initial = GroupStatus {
        leader: None,
        term: 0,
        is_leader: false,
        quorum_acked_at: None,
        last_applied: None,
        leading_since: None,
    };
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut since: Option<(u64, Instant)> = None;
        loop {
            let status = {
                let m = metrics.borrow_and_update();
                // A leader that removed itself from the group keeps its own id as
                // `current_leader` (its vote) but is no longer in the `Leader` state.
                let is_leader = m.current_leader == Some(m.id) && m.state == openraft::ServerState::Leader;
                let leader = m.current_leader.filter(|l| *l != m.id || is_leader);
                since = match since {
                    Some((term, at)) if is_leader && term == m.current_term => Some((term, at)),
                    _ if is_leader => Some((m.current_term, Instant::now())),
                    _ => None,
                };
                GroupStatus {
                    leader: leader.map(NodeId),
                    term: m.current_term,
                    is_leader,
                    quorum_acked_at: if is_leader {
                        m.millis_since_quorum_ack
                            .and_then(|ms| Instant::now().checked_sub(Duration::from_millis(ms)))
                    } else {
                        None
                    },
                    last_applied: m.last_applied.map(|l| l.index),
                    leading_since: since.map(|(_, at)| at),
                }
            };
            tx.send_replace(status);
            if metrics.changed().await.is_err() || tx.is_closed() {
                break;
            }
        }
    });
    rx
}
