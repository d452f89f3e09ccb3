//! The one place that turns internal records into bytes and back.
//!
//! Internal records (log entries, state-machine rows, snapshots, Raft RPC payloads) are bincode 2
//! with its serde integration. bincode is pinned (`=2.0.1`) and only this module names it, so a
//! future format change touches one file. Every record starts with a format-version byte; a
//! record with an unknown version is an error, never a guess.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The format version written as the first byte of every record.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be turned into a record, or a record into bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input was empty: not even a version byte.
    #[error("empty record")]
    Empty,
    /// The record was written by a format this build does not read.
    #[error("unknown record format version {0} (this build reads {FORMAT_VERSION})")]
    UnknownVersion(u8),
    /// The bytes after the version byte are not a valid record of the expected type.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The bytes held a valid record followed by trailing garbage.
    #[error("malformed record: {0} trailing bytes")]
    Trailing(usize),
    /// The value could not be encoded.
    #[error("cannot encode record: {0}")]
    Encode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as a versioned record.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(out)
}

/// The number of bytes [`encode`] would produce for `value`, computed without allocating them
/// (so that senders can bound what they pack before they build it).
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize, Error> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(value, &mut size, config())
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(1 + size.bytes_written)
}

/// Serde for a byte vector as one run of bytes rather than a sequence of numbers. bincode writes
/// both the same way (a length, then the bytes), so the stored format does not change; a
/// sequence is encoded and decoded one byte at a time, a run at once, which makes large
/// payloads cheap to encode (a log entry is encoded and decoded several times on its way).
pub mod bytes {
    use serde::{Deserializer, Serializer};

    /// Writes `value` as a run of bytes.
    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    /// Reads a run of bytes (or, from formats without one, a sequence of numbers).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }

    pub(super) struct BytesVisitor;

    impl<'de> serde::de::Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The size hint comes from the input: trust it only up to a bound.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// [`bytes`] for an optional byte vector.
pub mod opt_bytes {
    use serde::{Deserializer, Serializer};

    /// Writes `value` as an option of a run of bytes.
    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serializer.serialize_some(&Bytes(v)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads an option of a run of bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        deserializer.deserialize_option(OptVisitor)
    }

    struct Bytes<'a>(&'a [u8]);

    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    struct OptVisitor;

    impl<'de> serde::de::Visitor<'de> for OptVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("optional bytes")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_byte_buf(super::bytes::BytesVisitor).map(Some)
        }
    }
}

/// The most memory one decoded record may claim (bincode's decode limit). Without a limit a
/// garbage length prefix makes bincode allocate `len` bytes up front: a capacity-overflow panic
/// or an allocation abort instead of an error. The limit does not change the encoding.
pub const MAX_DECODED_BYTES: usize = 1 << 30;

/// Decodes a versioned record written by [`encode`]. The whole input must be one record.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let (&version, body) = bytes.split_first().ok_or(Error::Empty)?;
    if version != FORMAT_VERSION {
        return Err(Error::UnknownVersion(version));
    }
    let (value, used) = bincode::serde::decode_from_slice(body, config().with_limit::<MAX_DECODED_BYTES>())
        .map_err(|e| Error::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(Error::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Row {
        a: u64,
        b: String,
        c: Option<Vec<u8>>,
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let row = Row { a: 300, b: "xyz".into(), c: Some(vec![7; 1000]) };
        assert_eq!(encoded_len(&row).unwrap(), encode(&row).unwrap().len());
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct AsBytes {
        #[serde(with = "bytes")]
        a: Vec<u8>,
        #[serde(with = "opt_bytes")]
        b: Option<Vec<u8>>,
        #[serde(with = "opt_bytes")]
        c: Option<Vec<u8>>,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct AsSeq {
        a: Vec<u8>,
        b: Option<Vec<u8>>,
        c: Option<Vec<u8>>,
    }

    #[test]
    fn bytes_are_stored_as_before() {
        let fast = AsBytes { a: vec![1; 300], b: Some(vec![2, 3]), c: None };
        let slow = AsSeq { a: vec![1; 300], b: Some(vec![2, 3]), c: None };
        let bytes = encode(&fast).unwrap();
        assert_eq!(bytes, encode(&slow).unwrap());
        assert_eq!(decode::<AsSeq>(&bytes).unwrap(), slow);
        assert_eq!(decode::<AsBytes>(&bytes).unwrap(), fast);
    }

    #[test]
    fn round_trip() {
        let row = Row { a: 7, b: "x".into(), c: Some(vec![1, 2]) };
        let bytes = encode(&row).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Row>(&bytes).unwrap(), row);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(decode::<Row>(&[]), Err(Error::Empty)));
        assert!(matches!(decode::<Row>(&[9, 1, 2]), Err(Error::UnknownVersion(9))));
        assert!(matches!(decode::<Row>(&[FORMAT_VERSION, 0xff, 0xff]), Err(Error::Malformed(_))));
        let mut bytes = encode(&Row { a: 1, b: String::new(), c: None }).unwrap();
        bytes.push(0);
        assert!(matches!(decode::<Row>(&bytes), Err(Error::Trailing(1))));
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random garbage of many lengths.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..512 {
            let mut buf = vec![FORMAT_VERSION];
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode::<Row>(&buf);
            let _ = decode::<Vec<Row>>(&buf);
        }
    }
}
