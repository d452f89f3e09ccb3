//! Which shard a flow (or any named entity) lives on.
//!
//! `shard = xxh3_64(len-prefixed type ‖ len-prefixed instance) mod S`. xxh3 is specified and
//! stable across Rust releases (unlike `DefaultHasher`), so every node and every build agrees.

use xxhash_rust::xxh3::xxh3_64;

use crate::ids::{FlowId, ShardId};

/// The bytes hashed for a (type, instance) pair: each part as a little-endian u64 length then
/// its UTF-8 bytes, so `("ab","c")` and `("a","bc")` differ.
pub fn entity_key(kind: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + kind.len() + name.len());
    key.extend_from_slice(&(kind.len() as u64).to_le_bytes());
    key.extend_from_slice(kind.as_bytes());
    key.extend_from_slice(&(name.len() as u64).to_le_bytes());
    key.extend_from_slice(name.as_bytes());
    key
}

/// The shard of `(kind, name)` among `shard_count` shards.
///
/// # Panics
/// If `shard_count` is zero: a cluster always has at least one shard (checked at creation).
pub fn shard_of_entity(kind: &str, name: &str, shard_count: u32) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    ShardId((xxh3_64(&entity_key(kind, name)) % u64::from(shard_count)) as u32)
}

/// The shard of a flow among `shard_count` shards.
pub fn shard_of(flow: &FlowId, shard_count: u32) -> ShardId {
    shard_of_entity(&flow.flow_type, &flow.instance, shard_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_values() {
        // Pinned: a change here moves every flow of every existing cluster.
        assert_eq!(xxh3_64(&entity_key("order", "o-1")), 8_616_636_205_731_598_608);
        assert_eq!(shard_of(&FlowId::new("order", "o-1"), 12), ShardId(0));
        assert_eq!(shard_of(&FlowId::new("signup", "c-42"), 12), ShardId(8));
        assert_ne!(entity_key("ab", "c"), entity_key("a", "bc"));
    }

    #[test]
    fn spreads_over_shards() {
        let mut counts = [0u32; 12];
        for i in 0..12_000 {
            counts[shard_of(&FlowId::new("order", format!("o-{i}")), 12).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800 && c < 1200), "{counts:?}");
    }
}
