//! Cluster parameters a running shard actor follows: shared by every shard actor of a node and
//! updated by the node when group 0's parameters change, so that `cluster config set` takes
//! effect everywhere without a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fetter_raft::meta::ClusterParams;

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

    /// The parameters of a cluster as group 0 records them.
    pub fn of(cluster: &ClusterParams) -> Self {
        let params = Params::new(Duration::ZERO, Limits::default());
        params.follow(cluster);
        params
    }

    /// How long finished flows are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_millis(self.0.retention_ms.load(Ordering::SeqCst))
    }

    /// The bounds of every new activation.
    pub fn limits(&self) -> Limits {
        Limits { max_payload_bytes: self.0.max_payload_bytes.load(Ordering::SeqCst) }
    }

    /// Follows the cluster's parameters (every holder sees them from now on); whether they
    /// differed from the values held.
    pub fn follow(&self, cluster: &ClusterParams) -> bool {
        let retention_ms = self.0.retention_ms.swap(cluster.retention_ms, Ordering::SeqCst);
        let max_payload_bytes = self.0.max_payload_bytes.swap(cluster.max_payload_bytes, Ordering::SeqCst);
        retention_ms != cluster.retention_ms || max_payload_bytes != cluster.max_payload_bytes
    }
}

impl Default for Params {
    /// The cluster defaults (seven days of retention, 1 MiB payloads).
    fn default() -> Self {
        Params::of(&ClusterParams::default())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
