//! The key-value view a state machine's `apply` reads and writes.
//!
//! `apply` is written against [`Kv`] so that the same pure function runs on an in-memory map in
//! unit tests ([`MemKv`]) and on a sled tree in production ([`crate::storage`]'s overlay, which
//! buffers one batch's writes and commits them atomically together with `last_applied`).
//! Implementations must give read-your-writes within one batch and keys in byte order.

use std::collections::BTreeMap;
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

/// Key-value pairs returned by [`Kv::scan`], in key order.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key-value store with read-your-writes semantics.
pub trait Kv {
    /// The value at `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Sets `key` to `value`.
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>);
    /// Removes `key` (no-op if absent).
    fn delete(&mut self, key: &[u8]);
    /// Up to `limit` pairs whose key starts with `prefix` and is `>= start` (all of them when
    /// `start` is `None`), in key order.
    fn scan(&self, prefix: &[u8], start: Option<&[u8]>, limit: usize) -> Result<Rows, KvError>;
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

impl Kv for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.rows.get(key).cloned())
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.rows.insert(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        self.rows.remove(key);
    }

    fn scan(
        &self,
        prefix: &[u8],
        start: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_respects_prefix_start_and_limit() {
        let mut kv = MemKv::new();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            kv.put(k.as_bytes().to_vec(), vec![]);
        }
        let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| {
            v.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(keys(kv.scan(b"a/", None, 10).unwrap()), ["a/1", "a/2", "a/3"]);
        assert_eq!(keys(kv.scan(b"a/", Some(b"a/2"), 10).unwrap()), ["a/2", "a/3"]);
        assert_eq!(keys(kv.scan(b"a/", None, 2).unwrap()), ["a/1", "a/2"]);
        assert_eq!(keys(kv.scan(b"a/", Some(b"0"), 10).unwrap()), ["a/1", "a/2", "a/3"]);
        kv.delete(b"a/2");
        assert_eq!(keys(kv.scan(b"a/", None, 10).unwrap()), ["a/1", "a/3"]);
    }
}
