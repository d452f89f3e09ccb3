//! What a run records, as JSON lines in its directory, and reads back for the checker.
//!
//! - `history.jsonl`: every client operation as an `invoke` followed by one `ok`, `fail` (the
//!   operation certainly did not take effect) or `info` (its outcome is unknown: a timeout, a
//!   broken connection) with the same `id`;
//! - `faults.jsonl`: every fault with its start and (once healed) end;
//! - `ledger.jsonl`: the fake services' ledger, written by the nodes (`fetter_examples::ledger`);
//! - `final.jsonl`: every flow as read through the API after the final heal.
//! - `digests.jsonl`: every node's digest of every shard after the final heal;
//! - `placement.jsonl`: every shard's leader and replicas after the final heal, with the members
//!   the harness had then.
//!
//! The checker reads only these files: it shares no code with the node beyond the file formats.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The history file of a run directory.
pub const HISTORY: &str = "history.jsonl";
/// The fault file of a run directory.
pub const FAULTS: &str = "faults.jsonl";
/// The ledger file of a run directory.
pub const LEDGER: &str = "ledger.jsonl";
/// The final-state file of a run directory.
pub const FINAL: &str = "final.jsonl";
/// What a run was asked for (seed, nodes, …), as one JSON object.
pub const RUN: &str = "run.json";
/// The replica digests of a run directory.
pub const DIGESTS: &str = "digests.jsonl";
/// Where every shard's replicas were after the final heal.
pub const PLACEMENT: &str = "placement.jsonl";

/// The phase of an operation record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The client is about to send it.
    Invoke,
    /// It took effect and the client heard so.
    Ok,
    /// It certainly did not take effect (refused before anything was stored).
    Fail,
    /// Unknown: it may or may not have taken effect.
    Info,
}

/// What a client operation does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `StartFlow` of `flow_type/instance` with `input` (JSON text).
    Start {
        /// The flow type.
        flow_type: String,
        /// The instance.
        instance: String,
        /// The input, JSON text.
        input: String,
    },
    /// `SendMessage` to `flow_type/instance` with an idempotency key.
    Send {
        /// The flow type.
        flow_type: String,
        /// The instance.
        instance: String,
        /// The message type.
        message_type: String,
        /// The idempotency key.
        key: String,
        /// The payload, JSON text.
        payload: String,
    },
    /// A control-panel operation on `flow_type/instance`, as an operator runs it.
    Control {
        /// The flow type.
        flow_type: String,
        /// The instance.
        instance: String,
        /// What it does.
        action: ControlAction,
        /// The epoch the operator read and passed (`--epoch`): the operation is refused if the
        /// flow moved on since.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_epoch: Option<u64>,
    },
}

/// What a [`Op::Control`] operation does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Run the flow again with its input, keeping its recorded effects (they replay).
    Restart,
    /// Cancel the live flow.
    Cancel,
    /// Record `value` (JSON text) as what effect `effect_id` returns, so it never runs again.
    SetEffect {
        /// The effect.
        effect_id: String,
        /// Its value, JSON text.
        value: String,
    },
}

impl Op {
    /// `type/instance` of the flow the operation is about.
    pub fn flow(&self) -> String {
        match self {
            Op::Start { flow_type, instance, .. }
            | Op::Send { flow_type, instance, .. }
            | Op::Control { flow_type, instance, .. } => format!("{flow_type}/{instance}"),
        }
    }
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Pairs an `invoke` with its outcome.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// The client task (a logical process: one operation at a time).
    pub process: u32,
    /// The node the client sent it to first.
    pub node: u64,
    /// Which phase this line records.
    pub phase: Phase,
    /// The operation (repeated on every phase).
    #[serde(flatten)]
    pub op: Op,
    /// The error, on `fail` and `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The kinds of fault the harness injects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// `kill -9` of `node`, restarted at the end.
    Kill {
        /// The node.
        node: u64,
    },
    /// SIGSTOP of `node`, SIGCONT at the end.
    Pause {
        /// The node.
        node: u64,
    },
    /// SIGTERM of `node` (graceful), restarted at the end.
    Terminate {
        /// The node.
        node: u64,
    },
    /// The network between the two sides is cut (kernel rules), healed at the end.
    Partition {
        /// One side.
        a: Vec<u64>,
        /// The other side.
        b: Vec<u64>,
        /// Only the packets from `a` to `b` are dropped.
        #[serde(default)]
        one_way: bool,
    },
    /// `node` is lost with its disk, removed from the cluster, and node `by` joins in its place
    /// (the fault ends when `by` serves and holds replicas).
    Replace {
        /// The lost node.
        node: u64,
        /// The node that took its place.
        by: u64,
    },
    /// A fifth of the packets `node` sends are dropped at random, until the end.
    Lossy {
        /// The node.
        node: u64,
    },
}

/// One line of `faults.jsonl`: written when the fault starts (`end_ms` absent) and again when
/// it ends (with `end_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The fault's number in the run.
    pub id: u64,
    /// When it started (ms since the Unix epoch).
    pub start_ms: u64,
    /// When it was healed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<u64>,
    /// What it is.
    #[serde(flatten)]
    pub kind: FaultKind,
}

/// Each fault once, in id order: its start record and its end record (written when it was
/// healed) merged. A fault never healed keeps `end_ms: None`.
pub fn merge_faults(records: &[FaultRecord]) -> Vec<FaultRecord> {
    let mut by_id: std::collections::BTreeMap<u64, FaultRecord> = std::collections::BTreeMap::new();
    for f in records {
        let merged = by_id.entry(f.id).or_insert_with(|| f.clone());
        merged.start_ms = merged.start_ms.min(f.start_ms);
        merged.end_ms = merged.end_ms.max(f.end_ms);
    }
    by_id.into_values().collect()
}

/// Appends JSON lines to a file, from any task.
#[derive(Clone)]
pub struct Recorder {
    file: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Recorder {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Recorder> {
        let file =
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Recorder { file: Arc::new(Mutex::new(std::io::BufWriter::new(file))) })
    }

    /// Appends one record as a line.
    pub fn record<T: Serialize>(&self, value: &T) -> Result<()> {
        let line = serde_json::to_string(value)?;
        let mut file = self.file.lock().map_err(|_| anyhow::anyhow!("recorder poisoned"))?;
        writeln!(file, "{line}")?;
        Ok(())
    }

    /// Writes what is buffered to the file.
    pub fn flush(&self) -> Result<()> {
        let mut file = self.file.lock().map_err(|_| anyhow::anyhow!("recorder poisoned"))?;
        file.flush()?;
        Ok(())
    }
}

/// Reads every JSON line of `path` (a missing file reads as empty).
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: bad record", path.display(), n + 1))?,
        );
    }
    Ok(out)
}

/// Whether a flow status (as the API names it) is final.
pub fn terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// One line of `final.jsonl`: a flow as the API showed it after the final heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalFlow {
    /// `type/instance`.
    pub flow: String,
    /// `running`, `suspended`, `postponed`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    /// The error kind of a failed flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// The error message of a failed flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The input, JSON text.
    pub input: String,
    /// The messages in the flow's event log: (message type, payload JSON text).
    #[serde(default)]
    pub messages: Vec<(String, String)>,
    /// The output of a succeeded flow, JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Each timer firing in the flow's event log: (timer id, how many messages precede it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fired: Vec<(String, usize)>,
    /// Each child result in the flow's event log, in order: the child (`type/instance`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub child_results: Vec<String>,
}

/// One line of `digests.jsonl`: one node's replica of one shard after the final heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestRecord {
    /// The shard.
    pub shard: u32,
    /// The node.
    pub node: u64,
    /// The last index applied to this replica.
    pub applied_index: u64,
    /// Nothing was applied while the digest was computed.
    pub stable: bool,
    /// Rows in the replica's state.
    pub rows: u64,
    /// The digest of the state (hex).
    pub digest: String,
}

/// One line of `placement.jsonl`: one shard as cluster status showed it after the final heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// The shard.
    pub shard: u32,
    /// Its leader, if it had one.
    pub leader: Option<u64>,
    /// Its voters.
    pub replicas: Vec<u64>,
    /// The cluster's members as the harness knew them (replaced nodes gone, successors in).
    pub members: Vec<u64>,
}
