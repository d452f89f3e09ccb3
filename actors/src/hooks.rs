//! Test hooks (feature `test-hooks`, never in production builds): pause an activation at a
//! chosen point so that a test can commit something exactly there.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use fetter_raft::ids::FlowId;
use tokio::sync::Notify;

type Pause = (Arc<Notify>, Arc<Notify>);

static BEFORE_SUSPEND: LazyLock<Mutex<HashMap<FlowId, Pause>>> = LazyLock::new(Default::default);

/// The next time an activation of `flow` is about to commit `Suspend` (after it found no
/// matching event in the log), it signals the first `Notify` and waits for the second.
pub fn pause_before_suspend(flow: FlowId) -> (Arc<Notify>, Arc<Notify>) {
    let pause = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    if let Ok(mut pauses) = BEFORE_SUSPEND.lock() {
        pauses.insert(flow, pause.clone());
    }
    pause
}

pub(crate) async fn before_suspend(flow: &FlowId) {
    let pause = BEFORE_SUSPEND.lock().ok().and_then(|mut p| p.remove(flow));
    if let Some((reached, release)) = pause {
        reached.notify_one();
        release.notified().await;
    }
}
