//! Typed row helpers shared by the state machines (decode, get, put, scan).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::kv::{Kv, KvError, KvRead, Rows};

/// A corrupt-row error for `key`.
pub(crate) fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> KvError {
    KvError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: reason.to_string() }
}

/// Decodes the row stored at `key`.
pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, KvError> {
    codec::decode(bytes).map_err(|e| corrupt(key, e))
}

/// The row at `key`, decoded.
pub(crate) fn get<T: DeserializeOwned>(kv: &dyn KvRead, key: &[u8]) -> Result<Option<T>, KvError> {
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
pub(crate) fn scan_all(kv: &dyn KvRead, prefix: &[u8]) -> Result<Rows, KvError> {
    kv.scan(prefix, None, usize::MAX)
}
