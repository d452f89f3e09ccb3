//! Test hooks (feature `test-hooks`, never in production builds): make the node lose the answer
//! to a mutation it has applied, so that a test can exercise the client's retry of a request
//! whose outcome it never heard.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use fetter_raft::ids::FlowId;
use tokio::sync::Notify;

/// What a test holds to drive one lost answer: `applied` is signalled once the node has applied
/// the mutation, and the node then waits for `release` before it answers `UNAVAILABLE`.
#[derive(Clone)]
pub struct LostAnswer {
    /// Signalled when the mutation has been applied (its answer is being held).
    pub applied: Arc<Notify>,
    /// Notify it to let the node answer (with the lost-answer error).
    pub release: Arc<Notify>,
}

static LOSE: LazyLock<Mutex<HashMap<(&'static str, FlowId), LostAnswer>>> = LazyLock::new(Default::default);

/// The next answer of `rpc` (`"restart"`, `"cancel"`, `"send_message"`, …) about `flow` is lost:
/// the node applies the request, signals `applied`, waits for `release`, and answers
/// `UNAVAILABLE` as if the connection had broken.
pub fn lose_next_answer(rpc: &'static str, flow: FlowId) -> LostAnswer {
    let lost = LostAnswer { applied: Arc::new(Notify::new()), release: Arc::new(Notify::new()) };
    if let Ok(mut all) = LOSE.lock() {
        all.insert((rpc, flow), lost.clone());
    }
    lost
}

/// Called by the API after it applied `rpc` on `flow`: an error when the answer is to be lost.
pub(crate) async fn after_apply(rpc: &'static str, flow: &FlowId) -> Result<(), tonic::Status> {
    let lost = LOSE.lock().ok().and_then(|mut all| all.remove(&(rpc, flow.clone())));
    match lost {
        Some(lost) => {
            lost.applied.notify_one();
            lost.release.notified().await;
            Err(tonic::Status::unavailable("test hook: the answer was lost"))
        }
        None => Ok(()),
    }
}
