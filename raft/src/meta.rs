//! PLACEHOLDER
use serde::{Deserialize, Serialize};
use crate::kv::{Kv, KvError};
/// x
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand { /// x
 Noop }
/// x
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaOutcome { /// x
 Done }
/// x
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaRejection { /// x
 #[error("x")] NotInitialized }
/// x
pub type MetaReply = Result<MetaOutcome, MetaRejection>;
/// x
pub fn apply(_kv: &mut dyn Kv, _now_ms: u64, _cmd: &MetaCommand) -> Result<MetaReply, KvError> { Ok(Ok(MetaOutcome::Done)) }
