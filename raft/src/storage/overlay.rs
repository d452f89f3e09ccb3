//! A [`Kv`] over a sled tree that buffers one batch's writes in memory.
//!
//! Reads see the buffered writes first (read-your-writes), then the tree. [`Overlay::commit`]
//! writes the whole buffer as one atomic `sled::Batch`, so a batch of applied entries, its
//! `last_applied` row included, is either wholly on the tree or not at all.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::kv::{Kv, KvError};

/// Buffered writes over a sled tree. Dropping it without [`Overlay::commit`] discards them.
pub(crate) struct Overlay<'t> {
    tree: &'t sled::Tree,
    /// `Some(value)` for a put, `None` for a delete.
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'t> Overlay<'t> {
    pub(crate) fn new(tree: &'t sled::Tree) -> Self {
        Overlay { tree, pending: BTreeMap::new() }
    }

    /// Applies every buffered write to the tree atomically. Not flushed: durability of applied
    /// state comes from the Raft log (a crash re-applies from `last_applied`).
    pub(crate) fn commit(self) -> Result<(), sled::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in self.pending {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch)
    }
}

fn storage(e: sled::Error) -> KvError {
    KvError::Storage(e.to_string())
}

impl Kv for Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(v) = self.pending.get(key) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key).map_err(storage)?.map(|v| v.to_vec()))
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
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
        // Buffered rows in range, and enough tree rows that `limit` survive buffered deletes.
        let buffered: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .pending
            .range::<Vec<u8>, _>((Bound::Included(lower.clone()), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        let deletes = buffered.iter().filter(|(_, v)| v.is_none()).count();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for item in self.tree.range(lower..).take(limit.saturating_add(deletes)) {
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(prefix) {
                break;
            }
            merged.insert(k.to_vec(), v.to_vec());
        }
        // When the tree listing was cut short, tree rows above the last fetched key are unknown;
        // a buffered put above it must not jump ahead of them, so the answer stops there.
        let tree_cut = merged.len() >= limit.saturating_add(deletes);
        let last_tree_key = merged.keys().next_back().cloned();
        for (k, v) in buffered {
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        if let (true, Some(last)) = (tree_cut, last_tree_key) {
            merged.retain(|k, _| k <= &last);
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    /// The overlay must answer every scan exactly as a plain map holding the same rows would.
    #[test]
    fn overlay_scan_matches_a_plain_map() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        let mut model = MemKv::new();
        let mut x: u64 = 42;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let k = format!("p/{:02}", next() % 40).into_bytes();
            tree.insert(&k, b"t".to_vec()).unwrap();
            model.put(k, b"t".to_vec());
        }
        for round in 0..50 {
            let mut ov = Overlay::new(&tree);
            let mut m = model.clone();
            for _ in 0..20 {
                let k = format!("p/{:02}", next() % 40).into_bytes();
                if next() % 3 == 0 {
                    ov.delete(&k);
                    m.delete(&k);
                } else {
                    ov.put(k.clone(), vec![round]);
                    m.put(k, vec![round]);
                }
            }
            for limit in [0, 1, 3, 10, 100] {
                for start in [None, Some(b"p/10".as_slice()), Some(b"p/33".as_slice())] {
                    assert_eq!(ov.scan(b"p/", start, limit).unwrap(), m.scan(b"p/", start, limit).unwrap());
                }
            }
            ov.commit().unwrap();
            model = m;
            let all: Vec<_> =
                tree.iter().map(|r| r.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
            assert_eq!(all, model.rows.clone().into_iter().collect::<Vec<_>>());
        }
    }
}
