//! Reading a sled tree through [`KvRead`], for `apply` (under a [`crate::kv::Overlay`]) and for
//! readers of the applied state.

use std::ops::Bound;

use crate::kv::{KvError, KvRead, Rows};

/// A sled tree seen as a read-only ordered key-value store.
pub(crate) struct TreeKv<'t>(pub(crate) &'t sled::Tree);

fn storage(e: sled::Error) -> KvError {
    KvError::Storage(e.to_string())
}

impl KvRead for TreeKv<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.0.get(key).map_err(storage)?.map(|v| v.to_vec()))
    }

    fn scan(&self, prefix: &[u8], start: Option<&[u8]>, limit: usize) -> Result<Rows, KvError> {
        let lower = match start {
            Some(s) if s > prefix => s.to_vec(),
            _ => prefix.to_vec(),
        };
        let mut rows = Vec::new();
        for item in self.0.range::<Vec<u8>, _>((Bound::Included(lower), Bound::Unbounded)) {
            if rows.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(prefix) {
                break;
            }
            rows.push((k.to_vec(), v.to_vec()));
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{Kv, MemKv};

    /// The tree answers every scan exactly as a map holding the same rows.
    #[test]
    fn scans_match_a_plain_map() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        let mut model = MemKv::new();
        for k in ["a/1", "a/2", "a/3", "ab", "b/1", "a"] {
            tree.insert(k, b"v".to_vec()).unwrap();
            model.put(k.as_bytes().to_vec(), b"v".to_vec());
        }
        let view = TreeKv(&tree);
        for prefix in [b"".as_slice(), b"a", b"a/", b"b/", b"c"] {
            for start in [None, Some(b"a/2".as_slice()), Some(b"0".as_slice()), Some(b"z".as_slice())] {
                for limit in [0, 1, 2, 10] {
                    assert_eq!(
                        view.scan(prefix, start, limit).unwrap(),
                        model.scan(prefix, start, limit).unwrap()
                    );
                }
            }
        }
        assert_eq!(view.get(b"ab").unwrap(), Some(b"v".to_vec()));
        assert_eq!(view.get(b"zz").unwrap(), None);
    }
}
