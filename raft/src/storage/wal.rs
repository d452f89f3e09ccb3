//! The node's write-ahead log: the Raft log of every group it hosts, interleaved in segment files.
//!
//! A segment is `wal/{seq:016}.wal`: a header (magic, format, sequence number) followed by
//! records. A record is framed as `[payload length: u32 LE][crc32 of the payload: u32 LE][payload]`
//! and its payload starts with a kind byte and the group. Kinds: a log entry (with its log id, so
//! recovery never decodes entries), a truncation, a purge, a vote, the committed id, the drop of
//! a group this node no longer hosts (everything of it before that record is forgotten, and the
//! group is remembered as dropped), and that tombstone alone (carried into every new segment).
//!
//! Durability: writers append to the current segment under one lock (the bytes reach the OS page
//! cache, readable at once) and hand their acknowledgement to the log's flusher thread (the same
//! group commit as sled's, `super::flusher`), which takes every request waiting, `fdatasync`s each
//! segment written since its last round, and only then acknowledges them: one sync per
//! group-commit batch, shared by all groups. A new segment and the
//! directory entry that names it are synced when it is created, and the segment before it is
//! synced before anything in the new one is acknowledged (each round syncs every dirty segment).
//!
//! Recovery reads the segments in order. A record that is cut short or fails its checksum at the
//! end of the *last* segment is a torn write (nothing after it was ever acknowledged, because an
//! acknowledgement waits for the sync that covers every earlier byte): the file is truncated there,
//! with a warning naming the segment, the offset and the bytes dropped. A bad record anywhere else
//! is corruption and opening fails: it is detected, never replayed.
//!
//! Purge is by whole segments, oldest first: a segment is deleted once no group's live entry is in
//! it, and only after the purge records that say so are synced. A quiet group whose few entries
//! hold the oldest segment back has them copied into the current segment first. Each new segment
//! starts with every group's current vote, committed id and purge point, so an old segment is
//! never the only holder of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::{CommittedLeaderId, LogId, Vote};

use super::flusher::Flusher;
use crate::sync::lock;
use crate::types::TypeConfig;

/// The first bytes of every segment.
const MAGIC: &[u8; 8] = b"FETTWAL\x01";
/// Magic + sequence number.
const HEADER_LEN: u64 = 16;
/// Length + checksum before each record's payload.
const FRAME_LEN: usize = 8;
/// A segment is closed and a new one started once it is this long (records are never split).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// A payload longer than this is not a record of ours (bounds what recovery allocates).
const MAX_RECORD: usize = 256 * 1024 * 1024;

const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_PURGE: u8 = 3;
const KIND_VOTE: u8 = 4;
const KIND_COMMITTED: u8 = 5;
const KIND_DROP: u8 = 6;
const KIND_TOMBSTONE: u8 = 7;

/// Why the log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("write-ahead log {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record inside the log (not at its torn tail) is damaged.
    #[error("write-ahead log segment {path} is corrupt at offset {offset}: {why} (not replayed)")]
    Corrupt {
        /// The segment.
        path: String,
        /// Where its bad record starts.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
    /// The flusher thread is gone (the node is shutting down) or a sync failed.
    #[error("write-ahead log sync failed: {0}")]
    Sync(String),
}

fn io_err(path: &Path, source: std::io::Error) -> WalError {
    WalError::Io { path: path.display().to_string(), source }
}

/// Where an entry's record is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    /// Offset of the entry's bytes (after the record's frame and entry header).
    offset: u64,
    len: u32,
}

/// What the log holds for one group.
#[derive(Debug, Default, Clone)]
struct GroupLog {
    entries: BTreeMap<u64, (LogId<u64>, Loc)>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    purged: Option<LogId<u64>>,
}

/// One segment file.
struct Segment {
    path: PathBuf,
    file: Arc<File>,
}

/// What a writer holds the lock for.
struct State {
    dir: PathBuf,
    segment_bytes: u64,
    segments: BTreeMap<u64, Segment>,
    /// The segment being appended to and its length.
    current: u64,
    current_len: u64,
    groups: HashMap<u64, GroupLog>,
    /// Groups dropped here at some time (whether hosted again since or not).
    dropped: BTreeSet<u64>,
    /// Segments written since the flusher's last round.
    dirty: Vec<(u64, Arc<File>)>,
}

/// The node's write-ahead log. Cheap to clone.
#[derive(Clone)]
pub struct Wal {
    state: Arc<Mutex<State>>,
    flusher: Flusher,
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn put_log_id(out: &mut Vec<u8>, id: &Option<LogId<u64>>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.leader_id.term.to_le_bytes());
            out.extend_from_slice(&id.leader_id.node_id.to_le_bytes());
            out.extend_from_slice(&id.index.to_le_bytes());
        }
    }
}

/// Reads fixed-size fields off a record payload.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or("record too short")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "record too short")?))
    }
    fn log_id(&mut self) -> Result<Option<LogId<u64>>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let term = self.u64()?;
                let node = self.u64()?;
                let index = self.u64()?;
                Ok(Some(LogId::new(CommittedLeaderId::new(term, node), index)))
            }
            b => Err(format!("bad log id tag {b}")),
        }
    }
}

/// A record as recovery sees it.
enum Record {
    Entry { group: u64, log_id: LogId<u64>, offset_in_payload: usize, len: usize },
    Truncate { group: u64, since: u64 },
    Purge { group: u64, upto: LogId<u64> },
    Vote { group: u64, vote: Vote<u64> },
    Committed { group: u64, committed: Option<LogId<u64>> },
    Drop { group: u64 },
    Tombstone { group: u64 },
}

fn parse(payload: &[u8]) -> Result<Record, String> {
    let mut r = Reader { bytes: payload, at: 0 };
    let kind = r.u8()?;
    let group = r.u64()?;
    Ok(match kind {
        KIND_ENTRY => {
            let log_id = r.log_id()?.ok_or("entry without a log id")?;
            Record::Entry { group, log_id, offset_in_payload: r.at, len: payload.len() - r.at }
        }
        KIND_TRUNCATE => Record::Truncate { group, since: r.u64()? },
        KIND_PURGE => Record::Purge { group, upto: r.log_id()?.ok_or("purge without a log id")? },
        KIND_VOTE => {
            let term = r.u64()?;
            let node_id = r.u64()?;
            let committed = r.u8()? == 1;
            let mut vote = Vote::new(term, node_id);
            if committed {
                vote.commit();
            }
            Record::Vote { group, vote }
        }
        KIND_COMMITTED => Record::Committed { group, committed: r.log_id()? },
        KIND_DROP => Record::Drop { group },
        KIND_TOMBSTONE => Record::Tombstone { group },
        k => return Err(format!("unknown record kind {k}")),
    })
}

fn entry_header(group: u64, log_id: &LogId<u64>) -> Vec<u8> {
    let mut p = Vec::with_capacity(34);
    p.push(KIND_ENTRY);
    p.extend_from_slice(&group.to_le_bytes());
    put_log_id(&mut p, &Some(*log_id));
    p
}

fn meta_payload(kind: u8, group: u64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = Vec::with_capacity(34);
    p.push(kind);
    p.extend_from_slice(&group.to_le_bytes());
    body(&mut p);
    p
}

fn vote_payload(group: u64, vote: &Vote<u64>) -> Vec<u8> {
    meta_payload(KIND_VOTE, group, |p| {
        p.extend_from_slice(&vote.leader_id.term.to_le_bytes());
        p.extend_from_slice(&vote.leader_id.node_id.to_le_bytes());
        p.push(u8::from(vote.is_committed()));
    })
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.wal"))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

impl State {
    fn apply(&mut self, segment: u64, record: Record, payload_offset: u64) {
        match record {
            Record::Entry { group, log_id, offset_in_payload, len } => {
                let g = self.groups.entry(group).or_default();
                // An append at index i replaces whatever was at i and after (as openraft's
                // conflicting entries are truncated first, this only matters for safety).
                g.entries.split_off(&log_id.index);
                let loc = Loc { segment, offset: payload_offset + offset_in_payload as u64, len: len as u32 };
                g.entries.insert(log_id.index, (log_id, loc));
            }
            Record::Truncate { group, since } => {
                self.groups.entry(group).or_default().entries.split_off(&since);
            }
            Record::Purge { group, upto } => {
                let g = self.groups.entry(group).or_default();
                if g.purged.is_none_or(|p| p.index < upto.index) {
                    g.purged = Some(upto);
                }
                match upto.index.checked_add(1) {
                    Some(next) => g.entries = g.entries.split_off(&next),
                    None => g.entries.clear(),
                }
            }
            Record::Vote { group, vote } => self.groups.entry(group).or_default().vote = Some(vote),
            Record::Committed { group, committed } => {
                self.groups.entry(group).or_default().committed = committed
            }
            // Its entries no longer pin any segment, and a later roll copies nothing of it.
            Record::Drop { group } => {
                self.groups.remove(&group);
                self.dropped.insert(group);
            }
            Record::Tombstone { group } => {
                self.dropped.insert(group);
            }
        }
    }

    /// Appends framed `records` (each: payload) to the current segment, rolling to a new one
    /// first if it is full. Returns, per record, the file offset of its payload.
    fn write<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<Vec<u64>, WalError> {
        if self.current_len >= self.segment_bytes {
            self.roll()?;
        }
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.as_ref().len() + FRAME_LEN).sum());
        let mut offsets = Vec::with_capacity(payloads.len());
        for p in payloads {
            offsets.push(self.current_len + (buf.len() + FRAME_LEN) as u64);
            frame(p.as_ref(), &mut buf);
        }
        let seg =
            self.segments.get(&self.current).ok_or_else(|| WalError::Sync("no current segment".into()))?;
        seg.file.write_all_at(&buf, self.current_len).map_err(|e| io_err(&seg.path, e))?;
        self.current_len += buf.len() as u64;
        if !self.dirty.iter().any(|(s, _)| *s == self.current) {
            self.dirty.push((self.current, seg.file.clone()));
        }
        Ok(offsets)
    }

    /// Creates segment `seq` (header written and synced, directory synced) and appends to it
    /// from now on.
    fn add_segment(&mut self, seq: u64) -> Result<(), WalError> {
        let path = segment_path(&self.dir, seq);
        let file = create_segment(&path, seq)?;
        sync_dir(&self.dir)?;
        self.segments.insert(seq, Segment { path, file: Arc::new(file) });
        self.current = seq;
        self.current_len = HEADER_LEN;
        Ok(())
    }

    /// Starts a new segment, then copies every group's vote, committed id and purge point into it.
    fn roll(&mut self) -> Result<(), WalError> {
        self.add_segment(self.current + 1)?;
        let mut payloads = Vec::new();
        let mut groups: Vec<_> = self.groups.iter().collect();
        groups.sort_by_key(|(g, _)| **g);
        for (group, g) in groups {
            if let Some(vote) = &g.vote {
                payloads.push(vote_payload(*group, vote));
            }
            if g.committed.is_some() {
                payloads.push(meta_payload(KIND_COMMITTED, *group, |p| put_log_id(p, &g.committed)));
            }
            if g.purged.is_some() {
                payloads.push(meta_payload(KIND_PURGE, *group, |p| put_log_id(p, &g.purged)));
            }
        }
        for group in &self.dropped {
            payloads.push(meta_payload(KIND_TOMBSTONE, *group, |_| {}));
        }
        if !payloads.is_empty() {
            self.write(&payloads)?;
        }
        Ok(())
    }

    /// The oldest segment `group`'s live entries are in. A group's entries lie in segments in
    /// index order (appends, and the rewrites of [`State::rewrite`], always go to the current
    /// segment), so this is where its first live entry is.
    fn first_segment(g: &GroupLog) -> Option<u64> {
        g.entries.values().next().map(|(_, loc)| loc.segment)
    }

    /// Segments (oldest first, never the current one) no live entry is in any more.
    fn purgeable(&self) -> Vec<u64> {
        let pinned = self.groups.values().filter_map(State::first_segment).min().unwrap_or(self.current);
        let keep_from = pinned.min(self.current);
        self.segments.range(..keep_from).map(|(seq, _)| *seq).collect()
    }

    /// Copies the live entries of the quiet groups that hold the oldest segment back into the
    /// current one, so that segment can go: a group that rarely writes (and so rarely snapshots
    /// and purges) would otherwise keep every later segment on disk. Only done once the log has
    /// at least two closed segments, and only for groups whose live entries are small (at most an
    /// eighth of a segment); a busy group frees its segments with its next snapshot. Returns how
    /// many entries were copied. The copies are written like appends (same log ids, in index
    /// order), so recovery indexes them exactly as this does.
    fn rewrite_quiet(&mut self) -> Result<usize, WalError> {
        let closed = self.segments.len().saturating_sub(1);
        let Some(oldest) = self.segments.keys().next().copied() else { return Ok(0) };
        if closed < 2 || oldest == self.current {
            return Ok(0);
        }
        let budget = self.segment_bytes / 8;
        let mut quiet: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| State::first_segment(g) == Some(oldest))
            .filter(|(_, g)| g.entries.values().map(|(_, loc)| u64::from(loc.len)).sum::<u64>() <= budget)
            .map(|(group, _)| *group)
            .collect();
        quiet.sort_unstable();
        let mut copied = 0;
        for group in quiet {
            let live: Vec<(LogId<u64>, Loc)> =
                self.groups.get(&group).map(|g| g.entries.values().copied().collect()).unwrap_or_default();
            let mut entries = Vec::with_capacity(live.len());
            for (log_id, loc) in &live {
                let seg = self.segments.get(&loc.segment).ok_or_else(|| WalError::Corrupt {
                    path: segment_path(&self.dir, loc.segment).display().to_string(),
                    offset: loc.offset,
                    why: "an indexed entry's segment is gone".into(),
                })?;
                let mut bytes = vec![0u8; loc.len as usize];
                seg.file.read_exact_at(&mut bytes, loc.offset).map_err(|e| io_err(&seg.path, e))?;
                entries.push(EntryRecord::new(group, *log_id, &bytes));
            }
            self.append_entries(group, &entries)?;
            copied += entries.len();
        }
        Ok(copied)
    }

    /// Appends `entries` of `group` (in index order) and indexes them through the same path
    /// recovery uses.
    fn append_entries(&mut self, group: u64, entries: &[EntryRecord]) -> Result<(), WalError> {
        let offsets = self.write(entries)?;
        let segment = self.current;
        for (e, offset) in entries.iter().zip(offsets) {
            let len = e.payload.len() - e.header;
            let record = Record::Entry { group, log_id: e.log_id, offset_in_payload: e.header, len };
            self.apply(segment, record, offset);
        }
        Ok(())
    }
}

/// An entry's record payload (header, then the encoded entry), built before the log's lock is
/// taken.
struct EntryRecord {
    log_id: LogId<u64>,
    payload: Vec<u8>,
    /// The header's length: the entry starts there.
    header: usize,
}

impl EntryRecord {
    fn new(group: u64, log_id: LogId<u64>, entry: &[u8]) -> EntryRecord {
        let mut payload = entry_header(group, &log_id);
        let header = payload.len();
        payload.extend_from_slice(entry);
        EntryRecord { log_id, payload, header }
    }
}

impl AsRef<[u8]> for EntryRecord {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

fn create_segment(path: &Path, seq: u64) -> Result<File, WalError> {
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(|e| io_err(path, e))?;
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&seq.to_le_bytes());
    (&file).write_all(&header).map_err(|e| io_err(path, e))?;
    file.sync_all().map_err(|e| io_err(path, e))?;
    Ok(file)
}

/// What recovery did, for the log line and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes of a torn tail cut off the last segment.
    pub truncated_bytes: u64,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, replays it and starts its flusher thread.
    pub fn open(dir: &Path) -> Result<(Wal, Recovery), WalError> {
        Self::open_with(dir, DEFAULT_SEGMENT_BYTES)
    }

    /// [`Wal::open`] with segments of `segment_bytes` (tests use small ones).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<(Wal, Recovery), WalError> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut seqs = Vec::new();
        for item in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let item = item.map_err(|e| io_err(dir, e))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name.strip_suffix(".wal").and_then(|s| s.parse::<u64>().ok()) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut state = State {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: BTreeMap::new(),
            current: 0,
            current_len: HEADER_LEN,
            groups: HashMap::new(),
            dropped: BTreeSet::new(),
            dirty: Vec::new(),
        };
        let mut recovery = Recovery::default();
        for (i, seq) in seqs.iter().enumerate() {
            let last = i + 1 == seqs.len();
            let path = segment_path(dir, *seq);
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| io_err(&path, e))?;
            let bytes = fs::read(&path).map_err(|e| io_err(&path, e))?;
            let corrupt = |offset: u64, why: String| WalError::Corrupt {
                path: path.display().to_string(),
                offset,
                why,
            };
            let header_ok = bytes.len() >= HEADER_LEN as usize
                && &bytes[..8] == MAGIC
                && bytes[8..16] == seq.to_le_bytes();
            if !header_ok {
                if last
                    && bytes.len() < HEADER_LEN as usize
                    && MAGIC.starts_with(&bytes[..bytes.len().min(8)])
                {
                    // Created but its header never reached the disk: nothing was ever in it.
                    tracing::warn!(segment = %path.display(), bytes = bytes.len(), "write-ahead log: rewriting a segment whose header was torn");
                    drop(file);
                    fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                    state.add_segment(*seq)?;
                    recovery.segments += 1;
                    continue;
                }
                return Err(corrupt(0, "bad segment header".into()));
            }
            state.segments.insert(*seq, Segment { path: path.clone(), file: Arc::new(file) });
            let mut at = HEADER_LEN as usize;
            while at < bytes.len() {
                let bad = match read_record(&bytes, at) {
                    Ok((payload, next)) => match parse(payload) {
                        Ok(record) => {
                            state.apply(*seq, record, (at + FRAME_LEN) as u64);
                            recovery.records += 1;
                            at = next;
                            continue;
                        }
                        Err(why) => why,
                    },
                    Err(why) => why,
                };
                if !last {
                    return Err(corrupt(at as u64, bad));
                }
                if let Some(next) = written_after(&bytes, at) {
                    // Data the log wrote lies after the bad record: not a write cut short.
                    return Err(corrupt(
                        at as u64,
                        format!("{bad}, and a valid record follows at offset {next}"),
                    ));
                }
                let dropped = (bytes.len() - at) as u64;
                tracing::warn!(
                    segment = %path.display(),
                    offset = at,
                    dropped_bytes = dropped,
                    "write-ahead log: torn tail ({bad}); truncating it (never acknowledged)"
                );
                let seg = &state.segments[seq];
                seg.file.set_len(at as u64).map_err(|e| io_err(&path, e))?;
                seg.file.sync_all().map_err(|e| io_err(&path, e))?;
                recovery.truncated_bytes = dropped;
                break;
            }
            state.current = *seq;
            state.current_len = at.min(bytes.len()) as u64;
            recovery.segments += 1;
        }
        if state.segments.is_empty() {
            state.add_segment(1)?;
        }
        let state = Arc::new(Mutex::new(state));
        let synced = state.clone();
        let mut failed: Option<String> = None;
        let flusher = Flusher::start("wal-flusher", move || sync_dirty(&synced, &mut failed))
            .map_err(|e| io_err(dir, e))?;
        Ok((Wal { state, flusher }, recovery))
    }

    /// How many sync rounds the log has done.
    pub fn syncs(&self) -> u64 {
        self.flusher.fsyncs()
    }

    /// Appends `entries` (log id and encoded entry) of `group`; they are readable on return and
    /// `callback` fires once they are durable.
    pub(crate) async fn append(
        &self,
        group: u64,
        entries: Vec<(LogId<u64>, Vec<u8>)>,
        callback: openraft::storage::LogFlushed<TypeConfig>,
    ) -> Result<(), WalError> {
        self.write_entries(group, entries)?;
        self.flusher.flush_log(callback).await.map_err(WalError::Sync)
    }

    fn write_entries(&self, group: u64, entries: Vec<(LogId<u64>, Vec<u8>)>) -> Result<(), WalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let records: Vec<EntryRecord> =
            entries.iter().map(|(log_id, bytes)| EntryRecord::new(group, *log_id, bytes)).collect();
        lock(&self.state).append_entries(group, &records)
    }

    /// Writes a record that is not an entry and applies it to the index, as recovery will.
    fn write_record(&self, payload: Vec<u8>) -> Result<(), WalError> {
        let mut st = lock(&self.state);
        st.write(std::slice::from_ref(&payload))?;
        let record = parse(&payload).map_err(WalError::Sync)?;
        let current = st.current;
        st.apply(current, record, 0);
        Ok(())
    }

    /// Writes a record and waits until it is durable.
    async fn write_synced(&self, payload: Vec<u8>) -> Result<(), WalError> {
        self.write_record(payload)?;
        self.sync().await
    }

    /// Waits until everything written before this call is durable.
    pub async fn sync(&self) -> Result<(), WalError> {
        self.flusher.flush().await.map_err(WalError::Sync)
    }

    /// Stores `group`'s vote durably.
    pub async fn save_vote(&self, group: u64, vote: &Vote<u64>) -> Result<(), WalError> {
        self.write_synced(vote_payload(group, vote)).await
    }

    /// Stores `group`'s committed id (not synced: losing it only costs re-applying at restart).
    pub fn save_committed(&self, group: u64, committed: Option<LogId<u64>>) -> Result<(), WalError> {
        self.write_record(meta_payload(KIND_COMMITTED, group, |p| put_log_id(p, &committed)))
    }

    /// Removes `group`'s entries from `since` on, durably.
    pub async fn truncate(&self, group: u64, since: u64) -> Result<(), WalError> {
        self.write_synced(meta_payload(KIND_TRUNCATE, group, |p| p.extend_from_slice(&since.to_le_bytes())))
            .await
    }

    /// Purges `group`'s entries up to `upto`, then deletes the segments nothing needs any more
    /// (first copying quiet groups' entries out of the oldest one, see [`State::rewrite_quiet`]).
    pub async fn purge(&self, group: u64, upto: LogId<u64>) -> Result<(), WalError> {
        self.write_record(meta_payload(KIND_PURGE, group, |p| put_log_id(p, &Some(upto))))?;
        let copied = lock(&self.state).rewrite_quiet()?;
        if copied > 0 {
            tracing::debug!(
                entries = copied,
                "write-ahead log: copied quiet groups' entries out of the oldest segment"
            );
        }
        self.sync().await?;
        // The purge records and the copies are durable: segments they release can go.
        let removed: Vec<Segment> = {
            let mut st = lock(&self.state);
            let seqs = st.purgeable();
            seqs.iter().filter_map(|s| st.segments.remove(s)).collect()
        };
        for seg in &removed {
            fs::remove_file(&seg.path).map_err(|e| io_err(&seg.path, e))?;
            tracing::debug!(segment = %seg.path.display(), "write-ahead log: segment purged");
        }
        if !removed.is_empty() {
            let dir = lock(&self.state).dir.clone();
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Forgets everything of `group` (its entries, vote, committed id and purge point), durably:
    /// the node no longer hosts it. Its segments go with the next purge that frees them. The log
    /// remembers that the group was dropped here ([`Wal::was_dropped`]), for good.
    pub async fn drop_group(&self, group: u64) -> Result<(), WalError> {
        self.write_synced(meta_payload(KIND_DROP, group, |_| {})).await
    }

    /// Whether `group` was ever dropped on this node (its replica here forgot what it had
    /// acknowledged; see `transport::server` for why that matters to votes).
    pub fn was_dropped(&self, group: u64) -> bool {
        lock(&self.state).dropped.contains(&group)
    }

    /// Whether `group` was dropped on this node and the log holds nothing of it since (no entry,
    /// nothing purged): its replica here has forgotten what it acknowledged.
    pub fn forgot(&self, group: u64) -> bool {
        let st = lock(&self.state);
        st.dropped.contains(&group)
            && st.groups.get(&group).is_none_or(|g| g.entries.is_empty() && g.purged.is_none())
    }

    /// The groups the log holds anything of (entries, a vote, a committed id or a purge point).
    pub fn groups(&self) -> Vec<u64> {
        let mut groups: Vec<u64> = lock(&self.state).groups.keys().copied().collect();
        groups.sort_unstable();
        groups
    }

    /// `group`'s vote.
    pub fn vote(&self, group: u64) -> Option<Vote<u64>> {
        lock(&self.state).groups.get(&group).and_then(|g| g.vote)
    }

    /// `group`'s committed id.
    pub fn committed(&self, group: u64) -> Option<LogId<u64>> {
        lock(&self.state).groups.get(&group).and_then(|g| g.committed)
    }

    /// `group`'s purge point and last log id.
    pub fn log_state(&self, group: u64) -> (Option<LogId<u64>>, Option<LogId<u64>>) {
        let st = lock(&self.state);
        match st.groups.get(&group) {
            None => (None, None),
            Some(g) => (g.purged, g.entries.values().next_back().map(|(id, _)| *id).or(g.purged)),
        }
    }

    /// The encoded entries of `group` with indexes in `[from, to)`.
    pub fn read(&self, group: u64, from: u64, to: u64) -> Result<Vec<Vec<u8>>, WalError> {
        let locs: Vec<(Loc, Arc<File>, PathBuf)> = {
            let st = lock(&self.state);
            let Some(g) = st.groups.get(&group) else { return Ok(Vec::new()) };
            if from >= to {
                return Ok(Vec::new());
            }
            g.entries
                .range(from..to)
                .filter_map(|(_, (_, loc))| {
                    st.segments.get(&loc.segment).map(|s| (*loc, s.file.clone(), s.path.clone()))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(locs.len());
        for (loc, file, path) in locs {
            let mut buf = vec![0u8; loc.len as usize];
            file.read_exact_at(&mut buf, loc.offset).map_err(|e| io_err(&path, e))?;
            out.push(buf);
        }
        Ok(out)
    }

    /// The segment files, oldest first (for tests and the operator).
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        lock(&self.state).segments.values().map(|s| s.path.clone()).collect()
    }
}

/// Whether a bad record at `at` in the last segment is followed by data the log wrote: the offset
/// of the first valid record after it, unless everything from `at` up to that record is zeros.
///
/// A power cut tears only what was written after the last sync, and nothing after it was ever
/// acknowledged: it may leave the tail cut short or, as pages reach the disk out of order, a run
/// of never-written (zero) bytes with later unsynced records behind it. Both are a torn tail. A bad
/// record with non-zero bytes that is followed by a valid record is damage to data that was
/// written in order before it, which may have been acknowledged: corruption, not a torn tail.
fn written_after(bytes: &[u8], at: usize) -> Option<usize> {
    let next = (at + 1..bytes.len().saturating_sub(FRAME_LEN))
        .find(|p| read_record(bytes, *p).is_ok_and(|(payload, _)| parse(payload).is_ok()))?;
    if bytes[at..next].iter().all(|b| *b == 0) {
        None
    } else {
        Some(next)
    }
}

/// The record at `at`: its payload and where the next one starts, or why it is not a record.
fn read_record(bytes: &[u8], at: usize) -> Result<(&[u8], usize), String> {
    if bytes.len() - at < FRAME_LEN {
        return Err("record frame cut short".into());
    }
    let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
    let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
    if len == 0 || len > MAX_RECORD {
        return Err(format!("bad record length {len}"));
    }
    let start = at + FRAME_LEN;
    if bytes.len() - start < len {
        return Err(format!("record of {len} bytes cut short at {}", bytes.len() - start));
    }
    let payload = &bytes[start..start + len];
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((payload, start + len))
}

/// One sync round of the log's flusher: an `fdatasync` of every segment written since the last
/// round. After a failed one the kernel may have dropped the dirty pages, so nothing written
/// before can be trusted durable: `failed` keeps the error and every later round fails too.
fn sync_dirty(state: &Mutex<State>, failed: &mut Option<String>) -> Result<(), String> {
    if let Some(e) = failed {
        return Err(e.clone());
    }
    let dirty = std::mem::take(&mut lock(state).dirty);
    if crate::bugs::planted("ack-before-flush") {
        // The planted bug: appends are acknowledged with their bytes still in the page cache. A
        // `kill -9` cannot tell (the kernel keeps them); a power cut loses them.
        return Ok(());
    }
    for (seq, file) in &dirty {
        if let Err(e) = file.sync_data() {
            tracing::error!(segment = seq, "write-ahead log: fdatasync failed: {e}");
            let e = format!("fdatasync of segment {seq} failed: {e}");
            *failed = Some(e.clone());
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entries(from: u64, to: u64) -> Vec<(LogId<u64>, Vec<u8>)> {
        (from..=to).map(|i| (id(1, i), format!("entry {i}").into_bytes())).collect()
    }

    /// Appends one call per entry (a call's records always share a segment).
    fn append_each(wal: &Wal, group: u64, from: u64, to: u64) {
        for e in entries(from, to) {
            wal.write_entries(group, vec![e]).expect("append");
        }
    }

    fn indexes(wal: &Wal, group: u64) -> Vec<String> {
        wal.read(group, 0, u64::MAX)
            .expect("read")
            .into_iter()
            .map(|b| String::from_utf8(b).expect("utf8"))
            .collect()
    }

    fn open(dir: &Path, segment_bytes: u64) -> (Wal, Recovery) {
        Wal::open_with(dir, segment_bytes).expect("open wal")
    }

    #[tokio::test]
    async fn entries_votes_and_purges_survive_a_reopen_across_segments() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (wal, _) = open(dir.path(), 512);
            append_each(&wal, 1, 1, 40);
            wal.write_entries(2, entries(1, 10)).expect("append g2");
            wal.save_vote(1, &Vote::new(3, 2)).await.expect("vote");
            wal.truncate(2, 8).await.expect("truncate");
            wal.write_entries(2, vec![(id(2, 8), b"entry 8 of term 2".to_vec())]).expect("append");
            wal.save_committed(1, Some(id(1, 30))).expect("committed");
            wal.sync().await.expect("sync");
            assert!(wal.segment_paths().len() > 2, "small segments roll over");
        }
        let (wal, recovery) = open(dir.path(), 512);
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(indexes(&wal, 1).len(), 40);
        assert_eq!(indexes(&wal, 2).last().map(String::as_str), Some("entry 8 of term 2"));
        assert_eq!(indexes(&wal, 2).len(), 8);
        assert_eq!(wal.vote(1), Some(Vote::new(3, 2)));
        assert_eq!(wal.committed(1), Some(id(1, 30)));
        assert_eq!(wal.log_state(2), (None, Some(id(2, 8))));
    }

    #[tokio::test]
    async fn purge_deletes_whole_segments_once_every_group_is_past_them_and_keeps_the_vote() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (wal, _) = open(dir.path(), 512);
        wal.save_vote(1, &Vote::new(5, 1)).await.expect("vote");
        append_each(&wal, 1, 1, 60);
        // Group 2's entries are too large to be copied forward (over an eighth of a segment).
        let big = vec![(id(1, 1), vec![b'x'; 80]), (id(1, 2), vec![b'y'; 80])];
        wal.write_entries(2, big).expect("append g2");
        append_each(&wal, 1, 61, 120);
        let before = wal.segment_paths().len();
        wal.purge(1, id(1, 100)).await.expect("purge g1");
        // Group 2's two entries hold their segment (and every one after it) back.
        let held = wal.segment_paths().len();
        assert!(held < before, "segments only group 1 used are gone: {before} -> {held}");
        assert!(held > 1);
        wal.purge(2, id(1, 2)).await.expect("purge g2");
        assert!(wal.segment_paths().len() < held, "group 2's segment goes once it is purged too");
        drop(wal);
        let (wal, _) = open(dir.path(), 512);
        assert_eq!(wal.vote(1), Some(Vote::new(5, 1)), "the vote was copied into a newer segment");
        assert_eq!(wal.log_state(1), (Some(id(1, 100)), Some(id(1, 120))));
        assert_eq!(indexes(&wal, 1).len(), 20);
        assert_eq!(wal.log_state(2), (Some(id(1, 2)), Some(id(1, 2))));
    }

    /// A group that wrote a little long ago and never purges (group 0 of a quiet cluster) must
    /// not keep every later segment on disk: its entries are copied forward and stay readable.
    #[tokio::test]
    async fn a_quiet_groups_entries_are_copied_forward_so_old_segments_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (wal, _) = open(dir.path(), 512);
            wal.write_entries(2, entries(1, 3)).expect("append g2");
            for round in 0..5u64 {
                let from = round * 40 + 1;
                append_each(&wal, 1, from, from + 39);
                wal.purge(1, id(1, from + 35)).await.expect("purge g1");
            }
            let left = wal.segment_paths().len();
            assert!(left <= 3, "old segments went although group 2 never purged: {left} left");
            let first = wal.segment_paths()[0].clone();
            assert!(!first.ends_with("0000000000000001.wal"), "the first segment is gone");
            wal.write_entries(2, entries(4, 4)).expect("append g2 after the copy");
            wal.sync().await.expect("sync");
        }
        let (wal, _) = open(dir.path(), 512);
        assert_eq!(indexes(&wal, 2), vec!["entry 1", "entry 2", "entry 3", "entry 4"]);
        assert_eq!(wal.log_state(2), (None, Some(id(1, 4))));
        assert_eq!(wal.log_state(1), (Some(id(1, 196)), Some(id(1, 200))));
        assert_eq!(indexes(&wal, 1).len(), 4);
    }

    /// A dropped group is gone after a reopen, its entries no longer hold segments back, and the
    /// same group id can be hosted again from an empty log.
    #[tokio::test]
    async fn a_dropped_group_is_forgotten_and_releases_its_segments() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (wal, _) = open(dir.path(), 512);
            // Too large to be copied forward: only the drop can release its segment.
            wal.write_entries(2, vec![(id(1, 1), vec![b'x'; 80]), (id(1, 2), vec![b'y'; 80])])
                .expect("append g2");
            wal.save_vote(2, &Vote::new(4, 3)).await.expect("vote g2");
            append_each(&wal, 1, 1, 60);
            wal.purge(1, id(1, 55)).await.expect("purge g1");
            let held = wal.segment_paths().len();
            assert!(held > 2, "group 2 holds the old segments back: {held}");
            assert_eq!(wal.groups(), vec![1, 2]);
            wal.drop_group(2).await.expect("drop g2");
            assert_eq!(wal.groups(), vec![1]);
            assert!(wal.was_dropped(2) && !wal.was_dropped(1));
            assert_eq!(wal.log_state(2), (None, None));
            assert_eq!(wal.vote(2), None);
            let drop_segment = wal.segment_paths().last().cloned().expect("a segment");
            append_each(&wal, 1, 61, 80);
            wal.purge(1, id(1, 75)).await.expect("purge g1 again");
            assert!(wal.segment_paths().len() < held, "the dropped group's segment went");
            append_each(&wal, 1, 81, 160);
            wal.purge(1, id(1, 155)).await.expect("purge g1 once more");
            assert!(!drop_segment.exists(), "the segment of the drop record is gone too");
            // Hosted again later: a fresh log.
            wal.write_entries(2, entries(1, 1)).expect("append g2 again");
            wal.sync().await.expect("sync");
        }
        let (wal, _) = open(dir.path(), 512);
        assert_eq!(wal.groups(), vec![1, 2]);
        assert_eq!(indexes(&wal, 2), vec!["entry 1"]);
        assert_eq!(wal.vote(2), None, "the vote from before the drop stays forgotten");
        assert!(wal.was_dropped(2), "the tombstone was carried into newer segments");
        assert_eq!(wal.log_state(1), (Some(id(1, 155)), Some(id(1, 160))));
    }

    #[tokio::test]
    async fn a_torn_tail_is_truncated_and_what_was_synced_is_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = {
            let (wal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
            wal.write_entries(1, entries(1, 5)).expect("append");
            wal.sync().await.expect("sync");
            wal.segment_paths()[0].clone()
        };
        let synced = fs::metadata(&path).expect("meta").len();
        // A record half on disk, as a power cut during its write leaves it.
        let mut tail = Vec::new();
        let mut payload = entry_header(1, &id(1, 6));
        payload.extend_from_slice(b"entry 6");
        frame(&payload, &mut tail);
        tail.truncate(tail.len() - 3);
        let file = OpenOptions::new().append(true).open(&path).expect("open");
        (&file).write_all(&tail).expect("write");
        drop(file);
        let (wal, recovery) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(recovery.truncated_bytes, tail.len() as u64);
        assert_eq!(fs::metadata(&path).expect("meta").len(), synced);
        assert_eq!(indexes(&wal, 1).len(), 5);
        // The log goes on after the cut.
        wal.write_entries(1, entries(6, 6)).expect("append");
        wal.sync().await.expect("sync");
        drop(wal);
        let (wal, recovery) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(indexes(&wal, 1).len(), 6);
    }

    #[tokio::test]
    async fn a_flipped_bit_in_the_tail_record_fails_its_checksum_and_is_not_replayed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = {
            let (wal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
            wal.write_entries(1, entries(1, 3)).expect("append");
            wal.sync().await.expect("sync");
            wal.segment_paths()[0].clone()
        };
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x10;
        fs::write(&path, &bytes).expect("write");
        let (wal, recovery) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(indexes(&wal, 1), vec!["entry 1".to_string(), "entry 2".to_string()]);
    }

    /// A damaged record in the middle of the last segment is not a torn tail: the records after
    /// it were written (and maybe acknowledged) before the damage, so the log refuses to open
    /// rather than dropping them. A run of zeros with unsynced records behind it (pages written
    /// back out of order before a power cut) is a torn tail.
    #[tokio::test]
    async fn damage_in_the_middle_of_the_last_segment_is_corruption_but_a_zero_hole_is_torn() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = {
            let (wal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
            append_each(&wal, 1, 1, 6);
            wal.sync().await.expect("sync");
            wal.segment_paths()[0].clone()
        };
        let pristine = fs::read(&path).expect("read");
        let mut bytes = pristine.clone();
        bytes[HEADER_LEN as usize + FRAME_LEN + 3] ^= 0x01;
        fs::write(&path, &bytes).expect("write");
        match Wal::open_with(dir.path(), DEFAULT_SEGMENT_BYTES) {
            Err(WalError::Corrupt { offset, why, .. }) => {
                assert_eq!(offset, HEADER_LEN);
                assert!(why.contains("a valid record follows"), "{why}");
            }
            Err(e) => panic!("expected corruption, got {e}"),
            Ok(_) => panic!("a damaged record was cut off with every acknowledged one after it"),
        }
        assert_eq!(fs::read(&path).expect("read"), bytes, "the refused segment is left as it was");
        // Records 3 and 4 never reached the disk; 5 and 6 did (out of order).
        let mut bytes = pristine;
        let mut at = HEADER_LEN as usize;
        let mut starts = Vec::new();
        while at < bytes.len() {
            starts.push(at);
            at = read_record(&bytes, at).expect("record").1;
        }
        bytes[starts[2]..starts[4]].fill(0);
        fs::write(&path, &bytes).expect("write");
        let (wal, recovery) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(recovery.truncated_bytes, (bytes.len() - starts[2]) as u64);
        assert_eq!(indexes(&wal, 1), vec!["entry 1".to_string(), "entry 2".to_string()]);
    }

    #[tokio::test]
    async fn corruption_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = {
            let (wal, _) = open(dir.path(), 256);
            append_each(&wal, 1, 1, 30);
            wal.sync().await.expect("sync");
            assert!(wal.segment_paths().len() > 2);
            wal.segment_paths()[0].clone()
        };
        let mut bytes = fs::read(&first).expect("read");
        bytes[HEADER_LEN as usize + FRAME_LEN + 2] ^= 0xff;
        fs::write(&first, &bytes).expect("write");
        match Wal::open_with(dir.path(), 256) {
            Err(WalError::Corrupt { path, offset, .. }) => {
                assert_eq!(path, first.display().to_string());
                assert_eq!(offset, HEADER_LEN);
            }
            Err(e) => panic!("expected corruption, got {e}"),
            Ok(_) => panic!("a corrupt segment was replayed"),
        }
    }
}
