//! A write buffer over a [`Kv`] and the typed row helpers shared by the state machines.
//!
//! `apply` runs every command against an [`Overlay`]: reads see the command's own writes, and
//! the buffered writes reach the underlying store only when the command is accepted. So a
//! rejection found half-way through a command (a gap in an outbox batch, an unconfigured shard
//! while finishing a child) still changes nothing, without every code path having to validate
//! before it writes.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::kv::{Kv, KvError, Rows};

/// Buffered writes over a read-only base store, with read-your-writes and merged scans.
pub(crate) struct Overlay<'a> {
    base: &'a dyn Kv,
    /// `Some(value)`: put; `None`: delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    /// An empty buffer over `base`.
    pub(crate) fn new(base: &'a dyn Kv) -> Self {
        Overlay { base, writes: BTreeMap::new() }
    }

    /// The buffered writes, in key order.
    pub(crate) fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }
}

/// Applies buffered writes (from [`Overlay::into_writes`]) to `kv`, in key order.
pub(crate) fn commit(kv: &mut dyn Kv, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
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
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.base.get(key),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), None);
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

/// A corrupt-row error for `key`.
pub(crate) fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> KvError {
    KvError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: reason.to_string() }
}

/// Decodes the row stored at `key`.
pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, KvError> {
    codec::decode(bytes).map_err(|e| corrupt(key, e))
}

/// The row at `key`, decoded.
pub(crate) fn get<T: DeserializeOwned>(kv: &dyn Kv, key: &[u8]) -> Result<Option<T>, KvError> {
    match kv.get(key)? {
        Some(bytes) => decode(key, &bytes).map(Some),
        None => Ok(None),
    }
}

/// Stores `value` at `key`.
pub(crate) fn put<T: Serialize + ?Sized>(kv: &mut dyn Kv, key: Vec<u8>, value: &T) -> Result<(), KvError> {
    let bytes = codec::encode(value).map_err(|e| KvError::Storage(e.to_string()))?;
    kv.put(key, bytes);
    Ok(())
}

/// Every row whose key starts with `prefix`.
pub(crate) fn scan_all(kv: &dyn Kv, prefix: &[u8]) -> Result<Rows, KvError> {
    kv.scan(prefix, None, usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    fn keys(rows: Rows) -> Vec<String> {
        rows.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect()
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
