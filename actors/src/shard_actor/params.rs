//! Cluster parameters a running shard actor follows: shared by every shard actor of a node and
//! updated by the node when group 0's parameters change, so that `cluster config set` takes
//! effect everywhere without a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::activation::Limits;

/// Retention and payload limit, shared and updatable. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Params(Arc<Values>);

#[derive(Debug)]
struct Values {
    retention_ms: AtomicU64,
    max_payload_bytes: AtomicU64,
}

impl Params {
    /// Parameters with this retention and these limits.
    pub fn new(retention: Duration, limits: Limits) -> Self {
        Params(Arc::new(Values {
            retention_ms: AtomicU64::new(millis(retention)),
            max_payload_bytes: AtomicU64::new(limits.max_payload_bytes),
        }))
    }

    /// How long finished flows are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_millis(self.0.retention_ms.load(Ordering::SeqCst))
    }

    /// The bounds of every new activation.
    pub fn limits(&self) -> Limits {
        Limits { max_payload_bytes: self.0.max_payload_bytes.load(Ordering::SeqCst) }
    }

    /// Follows new values (every holder sees them from now on).
    pub fn set(&self, retention: Duration, limits: Limits) {
        self.0.retention_ms.store(millis(retention), Ordering::SeqCst);
        self.0.max_payload_bytes.store(limits.max_payload_bytes, Ordering::SeqCst);
    }
}

impl Default for Params {
    /// Seven days of retention, the default limits.
    fn default() -> Self {
        Params::new(Duration::from_secs(7 * 24 * 3600), Limits::default())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
