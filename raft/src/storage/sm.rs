//! The state machine of one group on sled, with generations for atomic snapshot install.
//!
//! A group's applied state lives in the tree `g{group}/sm/{generation}`; the group's meta tree
//! names the current generation and holds the latest snapshot.
//!
//! Applying a batch of entries is atomic, `last_applied` included, without a `sled::Batch` (see
//! the storage module for why): the batch's whole write set is first stored as one row, the
//! *redo record*, and then written row by row. sled recovers a prefix of its writes, so after a
//! crash either the redo record is missing and so is every row of its batch, or it is there and
//! [`StateMachineStore::open`] writes its rows again (they are absolute puts and deletes, so
//! writing them twice is harmless).
//!
//! Installing a snapshot writes a complete new generation, flushes it, then switches the
//! generation pointer (one insert) and drops the old tree; a crash at any point leaves one whole
//! generation.
//!
//! A snapshot is not a copy. Building one (every `snapshot_after_entries` entries, so openraft
//! can purge the log behind it) is a checkpoint: the applied state, already in sled, is made
//! durable and the snapshot's meta (last applied log id, membership) is stored beside it. Only
//! when a follower needs the state (it is behind the purged log) is the state encoded, at the
//! state machine's current last applied entry, on a blocking thread while the state-machine
//! worker waits, so that nothing is applied during the copy and the async workers never carry
//! it (a copy of a large state on them stalled every group of the node past its election
//! timeout: `snapshots_of_large_states_never_stall_the_runtime`).

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::Serialize;
use tokio::sync::broadcast;

use super::flusher::Flusher;
use super::tree::TreeKv;
use crate::codec;
use crate::ids::GroupId;
use crate::kv::{Kv, KvRead, Overlay};
use crate::shard::Action;
use crate::sync::{lock, read, write};
use crate::types::{Command, Entry, LogId, Reply, Response, StorageError, TypeConfig};
use crate::{meta, shard};

/// Rows the storage layer keeps beside the state machine's own (whose keys never start with 0).
const ROW_APPLIED: &[u8] = b"\x00last_applied";
const ROW_MEMBERSHIP: &[u8] = b"\x00membership";
/// The write set of the last applied batch (see the module comment).
const ROW_REDO: &[u8] = b"\x00redo";
/// Keys in the group's meta tree.
const KEY_GENERATION: &[u8] = b"sm_generation";
/// The meta of the latest snapshot (built or installed).
const KEY_SNAPSHOT: &[u8] = b"snapshot_meta";
/// Where earlier versions kept a whole copy of the state with the meta; removed at open.
const KEY_SNAPSHOT_COPY: &[u8] = b"snapshot";
/// First bytes of a snapshot's data (the encoding of [`encode_state`]).
const SNAPSHOT_MAGIC: &[u8; 8] = b"fetsnap1";

/// Bound on queued action batches per group; a consumer that lags re-derives from state.
const ACTIONS_CAPACITY: usize = 4096;

type Membership = StoredMembership<u64, openraft::BasicNode>;
type Meta = SnapshotMeta<u64, openraft::BasicNode>;

/// Which state machine a group runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Group 0: members, parameters, placement.
    Meta,
    /// A shard group: flows and their journals.
    Shard,
}

impl GroupKind {
    /// The kind of `group`: group 0 is the metadata group, every other one a shard.
    pub fn of(group: GroupId) -> GroupKind {
        if group == GroupId::META {
            GroupKind::Meta
        } else {
            GroupKind::Shard
        }
    }
}

/// Encodes every row of `tree`'s state ([`state_rows`]) as a snapshot's data: the magic, the
/// row count (u64), then per row the key's length (u32), the key, the value's length (u32), the
/// value, all little-endian. Written row by row: no other copy of the state is made.
fn encode_state(tree: &sled::Tree) -> Result<Vec<u8>, sled::Error> {
    let mut data = Vec::with_capacity(tree.len().saturating_mul(64));
    data.extend_from_slice(SNAPSHOT_MAGIC);
    data.extend_from_slice(&0u64.to_le_bytes());
    let mut rows = 0u64;
    for row in state_rows(tree) {
        let (k, v) = row?;
        for part in [&k, &v] {
            let len = u32::try_from(part.len()).expect("sled keys and values are far below 4 GiB");
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(part);
        }
        rows += 1;
    }
    data[SNAPSHOT_MAGIC.len()..SNAPSHOT_MAGIC.len() + 8].copy_from_slice(&rows.to_le_bytes());
    Ok(data)
}

/// A row of a snapshot's data: key and value.
type Row<'a> = (&'a [u8], &'a [u8]);

/// Why a snapshot's data cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed snapshot data: {0}")]
pub struct MalformedSnapshot(&'static str);

/// The rows of a snapshot's data ([`encode_state`]), checked: a wrong magic, a cut row, a row
/// count that does not match or bytes after the last row are errors.
fn decode_state(data: &[u8]) -> Result<Vec<Row<'_>>, MalformedSnapshot> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], MalformedSnapshot> {
        if data.len() < n {
            return Err(MalformedSnapshot("cut short"));
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    fn len(data: &mut &[u8]) -> Result<usize, MalformedSnapshot> {
        let bytes = take(data, 4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")) as usize)
    }
    let mut rest = data;
    if take(&mut rest, SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
        return Err(MalformedSnapshot("not a snapshot of this format"));
    }
    let count = u64::from_le_bytes(take(&mut rest, 8)?.try_into().expect("8 bytes"));
    let mut rows = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(rest.len() / 8));
    while !rest.is_empty() {
        let n = len(&mut rest)?;
        let key = take(&mut rest, n)?;
        let n = len(&mut rest)?;
        let value = take(&mut rest, n)?;
        rows.push((key, value));
    }
    if rows.len() as u64 != count {
        return Err(MalformedSnapshot("row count does not match"));
    }
    Ok(rows)
}

fn any(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn sm_read(e: AnyError) -> StorageError {
    StorageIOError::read_state_machine(e).into()
}

fn sm_write(e: AnyError) -> StorageError {
    StorageIOError::write_state_machine(e).into()
}

fn tree_name(group: GroupId, generation: u64) -> String {
    format!("g{}/sm/{generation}", group.0)
}

/// Read access to a group's applied state, valid across snapshot installs.
#[derive(Clone)]
pub struct StateReader {
    current: Arc<RwLock<sled::Tree>>,
}

impl StateReader {
    /// Runs `f` over the current applied state.
    pub fn read<R>(&self, f: impl FnOnce(&dyn KvRead) -> R) -> R {
        let tree = read(&self.current).clone();
        f(&TreeKv(&tree))
    }

    /// The last log id applied to this state.
    pub fn last_applied(&self) -> Result<Option<LogId>, StorageError> {
        self.read(|kv| read_row::<Option<LogId>>(kv, ROW_APPLIED).map(Option::flatten))
    }

    /// A digest of the whole applied state ([`state_rows`]), with the last applied index read before and after the scan:
    /// replicas at the same index must have the same digest. The scan is not a snapshot, so a
    /// digest is only meaningful when both indexes agree (nothing was applied meanwhile).
    pub fn digest(&self) -> Result<StateDigest, StorageError> {
        let before = self.last_applied()?.map(|l| l.index);
        let tree = read(&self.current).clone();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut rows = 0u64;
        for row in state_rows(&tree) {
            let (k, v) = row.map_err(|e| sm_read(any(e)))?;
            hasher.update(&(k.len() as u64).to_le_bytes());
            hasher.update(&k);
            hasher.update(&(v.len() as u64).to_le_bytes());
            hasher.update(&v);
            rows += 1;
        }
        let after = self.last_applied()?.map(|l| l.index);
        Ok(StateDigest { applied_index: after, stable: before == after, rows, digest: hasher.digest128() })
    }
}

/// The rows of a group's applied state in key order: every row of its tree but the redo record
/// (this replica's own bookkeeping of its last apply). What a snapshot carries and a digest hashes.
fn state_rows(tree: &sled::Tree) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> {
    tree.iter().filter(|r| r.as_ref().map_or(true, |(k, _)| k.as_ref() != ROW_REDO))
}

/// What [`StateReader::digest`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDigest {
    /// The last applied index after the scan.
    pub applied_index: Option<u64>,
    /// Nothing was applied while the rows were read.
    pub stable: bool,
    /// Rows hashed.
    pub rows: u64,
    /// xxh3-128 over every row (length-prefixed key and value, in key order).
    pub digest: u128,
}

fn read_row<T: serde::de::DeserializeOwned>(kv: &dyn KvRead, key: &[u8]) -> Result<Option<T>, StorageError> {
    match kv.get(key).map_err(|e| sm_read(any(e)))? {
        None => Ok(None),
        Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(|e| sm_read(any(e)))?)),
    }
}

/// The state machine storage of one group.
pub struct StateMachineStore {
    db: sled::Db,
    group: GroupId,
    kind: GroupKind,
    meta: sled::Tree,
    generation: u64,
    current: Arc<RwLock<sled::Tree>>,
    checkpoints: Flusher,
    actions: broadcast::Sender<Arc<Vec<Action>>>,
    /// Serializes writes of the stored snapshot (a build may finish while an install runs).
    snapshot_lock: Arc<Mutex<()>>,
    /// While set, [`RaftStateMachine::get_current_snapshot`] answers with the stored meta and
    /// no data (see [`StateMachineStore::starting`]).
    meta_only: Arc<AtomicBool>,
}

/// Returned by [`StateMachineStore::starting`]; [`StartGate::started`] ends the start.
pub struct StartGate(Arc<AtomicBool>);

impl StartGate {
    /// The group's Raft instance has started: later requests for the current snapshot come
    /// from replication to a follower, which needs the state.
    pub fn started(self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// A batch's write set: `Some(value)` puts, `None` deletes, in key order.
type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Writes `writes` row by row (the redo record is written before, by the caller).
fn write_rows(tree: &sled::Tree, writes: Writes) -> Result<(), StorageError> {
    for (key, value) in writes {
        match value {
            Some(v) => tree.insert(key, v),
            None => tree.remove(key),
        }
        .map_err(|e| sm_write(any(e)))?;
    }
    Ok(())
}

impl StateMachineStore {
    pub(super) fn open(
        db: sled::Db,
        meta: sled::Tree,
        group: GroupId,
        checkpoints: Flusher,
    ) -> Result<StateMachineStore, StorageError> {
        let generation: u64 = match meta.get(KEY_GENERATION).map_err(|e| sm_read(any(e)))? {
            None => 0,
            Some(b) => codec::decode(&b).map_err(|e| sm_read(any(e)))?,
        };
        // Drop generations left by an install that crashed before switching (or after, before
        // dropping the old one).
        let prefix = format!("g{}/sm/", group.0);
        let keep = tree_name(group, generation);
        for name in db.tree_names() {
            if name.starts_with(prefix.as_bytes()) && name.as_ref() != keep.as_bytes() {
                db.drop_tree(&name).map_err(|e| sm_write(any(e)))?;
            }
        }
        let tree = db.open_tree(&keep).map_err(|e| sm_read(any(e)))?;
        meta.remove(KEY_SNAPSHOT_COPY).map_err(|e| sm_write(any(e)))?;
        if let Some(bytes) = tree.get(ROW_REDO).map_err(|e| sm_read(any(e)))? {
            // Finish the last batch: a crash may have cut it after its redo record.
            let writes: Writes = codec::decode(&bytes).map_err(|e| sm_read(any(e)))?;
            write_rows(&tree, writes)?;
        }
        let (actions, _) = broadcast::channel(ACTIONS_CAPACITY);
        Ok(StateMachineStore {
            db,
            group,
            kind: GroupKind::of(group),
            meta,
            generation,
            current: Arc::new(RwLock::new(tree)),
            checkpoints,
            actions,
            snapshot_lock: Arc::new(Mutex::new(())),
            meta_only: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Marks the start of the group's Raft instance: until [`StartGate::started`], the current
    /// snapshot is answered with its stored meta only. openraft reads the current snapshot once
    /// while it starts (`StorageHelper::get_initial_state` in 0.9), for its meta alone; encoding
    /// the whole state there would make every restart copy every group's state.
    pub fn starting(&self) -> StartGate {
        self.meta_only.store(true, Ordering::SeqCst);
        StartGate(self.meta_only.clone())
    }

    /// The stored meta of the latest snapshot.
    fn stored_meta(&self) -> Result<Option<Meta>, StorageError> {
        read_meta(&self.meta)
    }

    /// Read access to the applied state.
    pub fn reader(&self) -> StateReader {
        StateReader { current: self.current.clone() }
    }

    /// A receiver of the actions emitted by applied shard commands (on every replica; only the
    /// leader acts on them).
    pub fn actions(&self) -> broadcast::Sender<Arc<Vec<Action>>> {
        self.actions.clone()
    }

    fn tree(&self) -> sled::Tree {
        read(&self.current).clone()
    }

    fn apply_command(
        &self,
        kv: &mut dyn Kv,
        (now_ms, proposer): (u64, crate::ids::NodeId),
        command: &Command,
        actions: &mut Vec<Action>,
    ) -> Result<Reply, StorageError> {
        match (self.kind, command) {
            (GroupKind::Shard, Command::Shard(cmd)) => {
                let (reply, mut acts) =
                    shard::apply_at(kv, now_ms, Some(proposer), cmd).map_err(|e| sm_write(any(e)))?;
                actions.append(&mut acts);
                Ok(Reply::Shard(reply))
            }
            (GroupKind::Meta, Command::Meta(cmd)) => {
                Ok(Reply::Meta(meta::apply(kv, now_ms, cmd).map_err(|e| sm_write(any(e)))?))
            }
            _ => Ok(Reply::WrongGroup),
        }
    }
}

fn encode_row<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    codec::encode(value).map_err(|e| sm_write(any(e)))
}

fn read_meta(meta: &sled::Tree) -> Result<Option<Meta>, StorageError> {
    match meta.get(KEY_SNAPSHOT).map_err(|e| sm_read(any(e)))? {
        None => Ok(None),
        Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(|e| sm_read(any(e)))?)),
    }
}

/// The last applied log id and membership recorded in `kv`.
fn applied_in(kv: &dyn KvRead) -> Result<(Option<LogId>, Membership), StorageError> {
    let applied = read_row::<Option<LogId>>(kv, ROW_APPLIED)?.flatten();
    let membership = read_row::<Membership>(kv, ROW_MEMBERSHIP)?.unwrap_or_default();
    Ok((applied, membership))
}

/// A snapshot meta for the state at `last_log_id`, with an id unique on this node.
fn new_meta(
    db: &sled::Db,
    last_log_id: Option<LogId>,
    last_membership: Membership,
) -> Result<Meta, StorageError> {
    let nonce = db.generate_id().map_err(|e| sm_write(any(e)))?;
    let snapshot_id = match last_log_id {
        Some(id) => format!("{}-{}-{nonce}", id.leader_id.term, id.index),
        None => format!("none-{nonce}"),
    };
    Ok(Meta { last_log_id, last_membership, snapshot_id })
}

/// Runs `f` on a blocking thread and waits for it.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| sm_write(AnyError::error(e)))?
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        applied_in(&TreeKv(&self.tree()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let tree = self.tree();
        let base = TreeKv(&tree);
        let mut kv = Overlay::new(&base);
        let mut responses = Vec::new();
        let mut actions = Vec::new();
        let mut last: Option<LogId> = None;
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::default()),
                EntryPayload::Normal(request) => {
                    let mut replies = Vec::with_capacity(request.commands.len());
                    for command in &request.commands {
                        // The entry's log id names the leader that appended it: the same on
                        // every replica, so apply stays deterministic.
                        let at = (request.now_ms, crate::ids::NodeId(entry.log_id.leader_id.node_id));
                        replies.push(self.apply_command(&mut kv, at, command, &mut actions)?);
                    }
                    responses.push(Response { replies });
                }
                EntryPayload::Membership(m) => {
                    kv.put(ROW_MEMBERSHIP.to_vec(), encode_row(&Membership::new(Some(entry.log_id), m))?);
                    responses.push(Response::default());
                }
            }
        }
        if last.is_some() {
            kv.put(ROW_APPLIED.to_vec(), encode_row(&last)?);
        }
        // Atomic through the redo record (module comment). Not flushed: after a crash openraft
        // re-applies from the durable state's last_applied, and the log is kept back to the last
        // checkpoint (storage module comment).
        let writes: Writes = kv.into_writes().into_iter().collect();
        tree.insert(ROW_REDO, encode_row(&writes)?).map_err(|e| sm_write(any(e)))?;
        write_rows(&tree, writes)?;
        if !actions.is_empty() {
            // No receiver is fine: nobody leads here, or the consumer re-derives from state.
            let _ = self.actions.send(Arc::new(actions));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Called by the state-machine worker between applies: the applied log id and the
        // membership read here are those of the state at this point.
        SnapshotBuilder {
            applied: applied_in(&TreeKv(&self.tree())),
            db: self.db.clone(),
            meta: self.meta.clone(),
            checkpoints: self.checkpoints.clone(),
            snapshot_lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let signature = Some(meta.signature());
        let snap_err = move |e: AnyError| -> StorageError {
            StorageIOError::new(ErrorSubject::Snapshot(signature.clone()), ErrorVerb::Write, e).into()
        };
        let data = snapshot.into_inner();
        let bytes = data.len();

        // 1. Write the complete new generation (on a blocking thread: it is the whole state)
        //    and make it durable. Malformed data leaves no tree behind.
        let next = self.generation + 1;
        let name = tree_name(self.group, next);
        let db = self.db.clone();
        let err = snap_err.clone();
        let tree = blocking(move || {
            db.drop_tree(&name).map_err(|e| err(any(e)))?;
            let tree = db.open_tree(&name).map_err(|e| err(any(e)))?;
            let written = decode_state(&data).map_err(|e| err(any(e))).and_then(|rows| {
                rows.into_iter().try_for_each(|(k, v)| tree.insert(k, v).map(drop).map_err(|e| err(any(e))))
            });
            if let Err(e) = written {
                db.drop_tree(&name).map_err(|e| err(any(e)))?;
                return Err(e);
            }
            Ok(tree)
        })
        .await?;
        self.checkpoints.flush().await.map_err(|e| snap_err(AnyError::error(e)))?;

        // 2. Switch to it with one insert and keep the snapshot's meta (a crash between the two
        //    leaves an older meta, which is harmless: it only names an older checkpoint).
        {
            let _guard = lock(&self.snapshot_lock);
            self.meta
                .insert(KEY_GENERATION, codec::encode(&next).map_err(|e| snap_err(any(e)))?)
                .map_err(|e| snap_err(any(e)))?;
            self.meta
                .insert(KEY_SNAPSHOT, codec::encode(meta).map_err(|e| snap_err(any(e)))?)
                .map_err(|e| snap_err(any(e)))?;
        }
        self.checkpoints.flush().await.map_err(|e| snap_err(AnyError::error(e)))?;

        // 3. Serve reads from it and drop the old generation.
        let old = tree_name(self.group, self.generation);
        *write(&self.current) = tree;
        self.generation = next;
        let db = self.db.clone();
        let err = snap_err.clone();
        blocking(move || db.drop_tree(&old).map(drop).map_err(|e| err(any(e)))).await?;
        tracing::info!(group = %self.group, last_log_id = ?meta.last_log_id, bytes, "installed a snapshot");
        // Everything derived from state may have changed: tell the leader's consumer.
        let _ = self.actions.send(Arc::new(Vec::new()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(stored) = self.stored_meta()? else {
            return Ok(None);
        };
        if self.meta_only.load(Ordering::SeqCst) {
            return Ok(Some(Snapshot { meta: stored, snapshot: Box::new(Cursor::new(Vec::new())) }));
        }
        // A follower needs the state. Encode it as it is now: this runs on the state-machine
        // worker, which waits for the blocking thread, so nothing is applied during the copy and
        // the copy is of one point (any point at or after the stored meta's does: every applied
        // entry is committed). The async workers stay free meanwhile.
        let tree = self.tree();
        let (data, (applied, membership)) = blocking(move || {
            let at = applied_in(&TreeKv(&tree))?;
            let data = encode_state(&tree).map_err(|e| sm_read(any(e)))?;
            Ok((data, at))
        })
        .await?;
        let meta =
            if applied == stored.last_log_id { stored } else { new_meta(&self.db, applied, membership)? };
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// Builds a snapshot, that is a checkpoint of the state at the point `get_snapshot_builder` was
/// called (module comment).
pub struct SnapshotBuilder {
    applied: Result<(Option<LogId>, Membership), StorageError>,
    db: sled::Db,
    meta: sled::Tree,
    checkpoints: Flusher,
    snapshot_lock: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// The returned snapshot carries no data: openraft uses only the meta of a snapshot it has
    /// built (to purge the log behind it); a follower that needs the state gets it from
    /// `get_current_snapshot`.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (last_log_id, last_membership) = self.applied.clone()?;
        let meta = new_meta(&self.db, last_log_id, last_membership)?;
        {
            // Keep the newest: an install may have stored a later snapshot meanwhile.
            let _guard = lock(&self.snapshot_lock);
            if read_meta(&self.meta)?.is_none_or(|stored| stored.last_log_id <= last_log_id) {
                self.meta
                    .insert(KEY_SNAPSHOT, codec::encode(&meta).map_err(|e| sm_write(any(e)))?)
                    .map_err(|e| sm_write(any(e)))?;
            }
        }
        // The checkpoint before openraft purges the log entries the snapshot covers: the applied
        // state (at or beyond the snapshot's last log id) and the meta are durable after it.
        self.checkpoints.flush().await.map_err(|e| sm_write(AnyError::error(e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry};

    use super::*;
    use crate::ids::ShardId;
    use crate::shard::ShardCommand;
    use crate::storage::Store;
    use crate::types::Request;

    fn entry(index: u64, command: ShardCommand) -> crate::types::Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Request { now_ms: 1, commands: vec![Command::Shard(command)] }),
        }
    }

    /// A crash between the redo record and the rows of a batch: reopening finishes the batch.
    #[tokio::test]
    async fn reopen_finishes_a_batch_cut_after_its_redo_record() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupId(1);
        {
            let store = Store::open(dir.path()).unwrap();
            let (_log, mut sm) = store.group(group).unwrap();
            // As every group that has applied anything has a vote in the log (without it the
            // store drops the group's state at open as a leftover of a drop).
            store.wal.save_vote(u64::from(group.0), &openraft::Vote::new(1, 0)).await.unwrap();
            let configure = ShardCommand::Configure { shard_id: ShardId(0), shard_count: 1 };
            sm.apply([entry(1, configure)]).await.unwrap();
            // The next batch got as far as its redo record: a new row and last_applied = 2.
            let applied_2 = encode_row(&Some(LogId::new(CommittedLeaderId::new(1, 0), 2))).unwrap();
            let writes: Writes =
                vec![(ROW_APPLIED.to_vec(), Some(applied_2)), (b"Zrow".to_vec(), Some(b"v".to_vec()))];
            sm.tree().insert(ROW_REDO, encode_row(&writes).unwrap()).unwrap();
            store.db().flush().unwrap();
        }
        let store = crate::storage::tests::reopen(dir.path()).await;
        let (_log, mut sm) = store.group(group).unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(2), "last_applied of the cut batch");
        assert_eq!(sm.reader().read(|kv| kv.get(b"Zrow")).unwrap(), Some(b"v".to_vec()));
        // Rows of earlier batches are untouched.
        assert!(sm.reader().read(|kv| crate::shard::shard_config(kv)).unwrap().is_some());
    }

    /// Snapshots carry the state rows and last_applied, never the redo record.
    #[tokio::test]
    async fn snapshot_excludes_the_redo_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm) = store.group(GroupId(1)).unwrap();
        sm.apply([entry(1, ShardCommand::Configure { shard_id: ShardId(0), shard_count: 1 })]).await.unwrap();
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().expect("a snapshot was built");
        assert_eq!(snapshot.meta, built.meta, "nothing applied since the build: the same snapshot");
        let rows = decode_state(snapshot.snapshot.get_ref()).unwrap();
        assert!(rows.iter().all(|(k, _)| *k != ROW_REDO));
        assert!(rows.iter().any(|(k, _)| *k == ROW_APPLIED));
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(1));
    }

    /// The current snapshot is the state at the last applied entry, not at the last build; while
    /// the group starts it is the stored meta alone.
    #[tokio::test]
    async fn the_current_snapshot_is_the_state_as_applied_and_only_meta_while_starting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm) = store.group(GroupId(1)).unwrap();
        sm.apply([entry(1, ShardCommand::Configure { shard_id: ShardId(0), shard_count: 1 })]).await.unwrap();
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert!(built.snapshot.get_ref().is_empty(), "a build is a checkpoint, not a copy");
        let flow = crate::ids::FlowId::new("t", "f");
        sm.apply([entry(2, ShardCommand::Start { flow: flow.clone(), input: b"{}".to_vec(), parent: None })])
            .await
            .unwrap();

        let gate = sm.starting();
        let at_start = sm.get_current_snapshot().await.unwrap().expect("stored meta");
        assert_eq!(at_start.meta, built.meta);
        assert!(at_start.snapshot.get_ref().is_empty(), "no copy while the group starts");
        gate.started();

        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(2));
        assert_ne!(current.meta.snapshot_id, built.meta.snapshot_id);
        let rows = decode_state(current.snapshot.get_ref()).unwrap();
        let copy =
            crate::kv::MemKv { rows: rows.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect() };
        assert!(
            crate::shard::get_flow(&copy, &flow).unwrap().is_some(),
            "the flow started after the build is in it"
        );
    }

    /// Malformed snapshot data is refused and changes nothing.
    #[tokio::test]
    async fn a_malformed_snapshot_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_log, mut sm) = store.group(GroupId(1)).unwrap();
        sm.apply([entry(1, ShardCommand::Configure { shard_id: ShardId(0), shard_count: 1 })]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let good = sm.get_current_snapshot().await.unwrap().expect("a snapshot");
        let data = good.snapshot.into_inner();
        let mut meta = good.meta.clone();
        meta.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 0), 9));
        let before = sm.reader().digest().unwrap();
        let cut = data[..data.len() - 1].to_vec();
        let mut extra = data.clone();
        extra.push(0);
        let mut miscounted = data.clone();
        miscounted[SNAPSHOT_MAGIC.len()] += 1;
        for (what, bad) in
            [("cut", cut), ("trailing", extra), ("miscounted", miscounted), ("garbage", b"x".to_vec())]
        {
            let result = sm.install_snapshot(&meta, Box::new(Cursor::new(bad))).await;
            assert!(result.is_err(), "{what} data was installed");
            assert_eq!(sm.reader().digest().unwrap(), before, "{what} data changed the state");
        }
        let trees = store.db().tree_names().into_iter().filter(|n| n.starts_with(b"g1/sm/")).count();
        assert_eq!(trees, 1, "no partial generation left behind");
    }
}
