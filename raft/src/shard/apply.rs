//! PLACEHOLDER in /work/main until the real apply lands.
use crate::kv::{Kv, KvError};
use super::command::*;
/// placeholder
pub fn apply(_kv: &mut dyn Kv, _now_ms: u64, _cmd: &ShardCommand) -> Result<(ShardReply, Vec<Action>), KvError> {
    Ok((Err(Rejection::Invalid("placeholder".into())), vec![]))
}
