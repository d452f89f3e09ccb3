//! The key-value view a state machine's `apply` reads and writes.
//!
//! `apply` is written against [`Kv`] so that the same pure function runs on an in-memory map in
//! unit tests ([`MemKv`]) and on a sled tree in production (an [`Overlay`] over the tree, whose
//! write set the storage layer commits atomically together with `last_applied`).
//! Implementations must give read-your-writes within one batch and keys in byte order.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

/// A storage failure below the state machine. Never a rejection of a command: those are replies.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The underlying store failed.
    #[error("state-machine storage failed: {0}")]
    Storage(String),
    /// A stored row could not be decoded: the store is corrupt or from another format.
    #[error("corrupt state-machine row {key:?}: {reason}")]
    Corrupt {
        /// The key of the row, lossily printed.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Key-value pairs returned by [`KvRead::scan`], in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Reading an ordered key-value store.
pub trait KvRead {
    /// The value at `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Up to `limit` pairs whose key starts with `prefix` and is `>= start` (all of them when
    /// `start` is `None`), in key order.
    fn scan(&self, prefix: &[u8], start: Option<&[u8]>, limit: usize) -> Result<Rows, KvError>;
}

/// An ordered key-value store with read-your-writes semantics.
pub trait Kv: KvRead {
    /// Sets `key` to `value`.
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    /// Removes `key` (no-op if absent).
    fn delete(&mut self, key: &[u8]);
}

/// An in-memory [`Kv`]: unit tests of `apply`, and the consistent copy a snapshot is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemKv {
    /// The rows in key order.
    pub rows: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.rows.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8], start: Option<&[u8]>, limit: usize) -> Result<Rows, KvError> {
        let lower = match start {
            Some(s) if s > prefix => s.to_vec(),
            _ => prefix.to_vec(),
        };
        Ok(self
            .rows
            .range::<Vec<u8>, _>((Bound::Included(lower), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Kv for MemKv {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.rows.insert(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        self.rows.remove(key);
    }
}

/// Buffered writes over a read-only base: reads see the buffer first (read-your-writes), scans
/// merge both in key order. `apply` runs every command against one, so a rejection found
/// half-way through a command changes nothing; the storage layer runs each batch of entries
/// against one, so the whole batch's write set is known before any of it reaches sled.
pub struct Overlay<'a> {
    base: &'a dyn KvRead,
    /// `Some(value)`: put; `None`: delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    /// An empty buffer over `base`.
    pub fn new(base: &'a dyn KvRead) -> Self {
        Overlay { base, writes: BTreeMap::new() }
    }

    /// The buffered writes, in key order.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }
}

/// Applies buffered writes (from [`Overlay::into_writes`]) to `kv`, in key order.
pub fn commit(kv: &mut dyn Kv, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
    for (key, value) in writes {
        match value {
            Some(value) => kv.put(key, value),
            None => kv.delete(&key),
        }
    }
}

/// Which stream the next key of a merged scan comes from.
enum Next {
    Base,
    Overlay,
    /// Both have the key: the overlay's write wins, the base row is dropped.
    Both,
    Done,
}

impl Kv for Overlay<'_> {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), None);
    }
}

impl KvRead for Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(&self, prefix: &[u8], start: Option<&[u8]>, limit: usize) -> Result<Rows, KvError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let lower = match start {
            Some(s) if s > prefix => s.to_vec(),
            _ => prefix.to_vec(),
        };
        let mut buffered = self
            .writes
            .range::<Vec<u8>, _>((Bound::Included(lower.clone()), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        // The base is read in chunks: deletes in the buffer may hide any number of its rows.
        let chunk = limit.clamp(16, 1024);
        let mut base: VecDeque<(Vec<u8>, Vec<u8>)> = self.base.scan(prefix, Some(&lower), chunk)?.into();
        let mut base_done = base.len() < chunk;
        let mut last_base: Option<Vec<u8>> = None;
        while out.len() < limit {
            if base.is_empty() && !base_done {
                if let Some(last) = &last_base {
                    let mut after = last.clone();
                    after.push(0);
                    base = self.base.scan(prefix, Some(&after), chunk)?.into();
                    base_done = base.len() < chunk;
                } else {
                    base_done = true;
                }
            }
            let next = match (base.front(), buffered.peek()) {
                (None, None) => Next::Done,
                (Some(_), None) => Next::Base,
                (None, Some(_)) => Next::Overlay,
                (Some((bk, _)), Some((ok, _))) => match bk.cmp(ok) {
                    std::cmp::Ordering::Less => Next::Base,
                    std::cmp::Ordering::Equal => Next::Both,
                    std::cmp::Ordering::Greater => Next::Overlay,
                },
            };
            match next {
                Next::Done => break,
                Next::Base => {
                    if let Some((k, v)) = base.pop_front() {
                        last_base = Some(k.clone());
                        out.push((k, v));
                    }
                }
                Next::Overlay | Next::Both => {
                    if matches!(next, Next::Both) {
                        if let Some((k, _)) = base.pop_front() {
                            last_base = Some(k);
                        }
                    }
                    if let Some((k, Some(v))) = buffered.next() {
                        out.push((k.clone(), v.clone()));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(rows: Rows) -> Vec<String> {
        rows.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect()
    }

    #[test]
    fn scan_respects_prefix_start_and_limit() {
        let mut kv = MemKv::new();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            kv.put(k.as_bytes().to_vec(), vec![]);
        }
        assert_eq!(keys(kv.scan(b"a/", None, 10).unwrap()), ["a/1", "a/2", "a/3"]);
        assert_eq!(keys(kv.scan(b"a/", Some(b"a/2"), 10).unwrap()), ["a/2", "a/3"]);
        assert_eq!(keys(kv.scan(b"a/", None, 2).unwrap()), ["a/1", "a/2"]);
        assert_eq!(keys(kv.scan(b"a/", Some(b"0"), 10).unwrap()), ["a/1", "a/2", "a/3"]);
        kv.delete(b"a/2");
        assert_eq!(keys(kv.scan(b"a/", None, 10).unwrap()), ["a/1", "a/3"]);
    }

    #[test]
    fn overlay_merges_scans_and_hides_deletes() {
        let mut base = MemKv::new();
        for i in 0..100 {
            base.put(format!("a/{i:03}").into_bytes(), vec![1]);
        }
        base.put(b"b/1".to_vec(), vec![1]);
        let mut ov = Overlay::new(&base);
        // Delete a long run so the chunked base scan has to refill past hidden rows.
        for i in 0..60 {
            ov.delete(format!("a/{i:03}").as_bytes());
        }
        ov.put(b"a/0005x".to_vec(), vec![2]);
        ov.put(b"a/100".to_vec(), vec![2]);
        ov.put(b"a/070".to_vec(), vec![3]);
        assert_eq!(ov.get(b"a/001").unwrap(), None);
        assert_eq!(ov.get(b"a/070").unwrap(), Some(vec![3]));
        assert_eq!(ov.get(b"a/080").unwrap(), Some(vec![1]));

        let all = ov.scan(b"a/", None, usize::MAX).unwrap();
        let mut expected: Vec<String> = vec!["a/0005x".into()];
        expected.extend((60..=100).map(|i| format!("a/{i:03}")));
        assert_eq!(keys(all.clone()), expected);
        assert_eq!(all.iter().find(|(k, _)| k == b"a/070").unwrap().1, vec![3]);
        assert_eq!(keys(ov.scan(b"a/", None, 3).unwrap()), ["a/0005x", "a/060", "a/061"]);
        assert_eq!(keys(ov.scan(b"a/", Some(b"a/099"), 10).unwrap()), ["a/099", "a/100"]);
        assert!(ov.scan(b"a/", None, 0).unwrap().is_empty());

        // The buffer equals what the base becomes after commit.
        let merged = ov.scan(b"", None, usize::MAX).unwrap();
        let writes = ov.into_writes();
        let mut committed = base.clone();
        commit(&mut committed, writes);
        assert_eq!(merged, committed.scan(b"", None, usize::MAX).unwrap());
    }
}
