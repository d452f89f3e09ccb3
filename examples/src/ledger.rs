//! The ledger: an append-only JSON-lines file of every call the fake services received.
//!
//! Each call is one line, `{"service":…,"op":…,"flow":"<type>/<instance>","key":…,"node":<id>,"ts_ms":…,"epoch":<n>}`
//! (DESIGN.md §5); `epoch`, the calling activation's epoch, is there when the call came from a
//! flow's activation (a fencing token: [`fetter::activation::current`]). Several processes (the nodes of a local cluster, a test harness) append to the
//! same file at once, so the format keeps one invariant: **a line is written by exactly one
//! `write` syscall on a file opened with `O_APPEND`**. The kernel then places each write at the end
//! of the file as a whole, and lines from concurrent writers never interleave.
//!
//! Reading is strict: [`Ledger::read_all`] returns every line or an error naming the first bad
//! line; it never skips anything, because a skipped line would be a miscounted effect.
//!
//! ## Names: a public contract
//!
//! The services are exactly `payment`, `logistics`, `email` and `bureau`, with these ops and keys
//! (recorded by [`crate::fakes`]):
//!
//! | service | op | key |
//! |---|---|---|
//! | `payment` | `reserve`, `capture`, `cancel` | the transaction id (a UUID in the order flows) |
//! | `logistics` | `ship` | the order id, e.g. `o-1` |
//! | `email` | `send` | `<template>:<subject>`, e.g. `order-confirmation:o-1`, `reminder:c-1`, `newsletter:a@x` |
//! | `bureau` | `check` | `<bureau>:<application id>`, e.g. `bureau-a:l-1` |
//!
//! The email templates are `order-confirmation` (about an order id), `activation`, `reminder`
//! and `welcome` (about a customer id) and `newsletter` (about the recipient's address).
//!
//! ```no_run
//! use fetter_examples::ledger::{count, Ledger, LedgerEntry};
//!
//! # fn main() -> Result<(), fetter_examples::ledger::LedgerError> {
//! let ledger = Ledger::open("/tmp/ledger.jsonl")?;
//! ledger.record(&LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 1))?;
//! let entries = Ledger::read_all(ledger.path())?;
//! assert_eq!(count(&entries, "payment", "reserve", "order/o-1"), 1);
//! # Ok(())
//! # }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One call received by a fake service: one line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The service that received the call: `"payment"`, `"logistics"`, `"email"` or `"bureau"`.
    pub service: String,
    /// The operation called, e.g. `"reserve"`, `"ship"`, `"send"`, `"check"`.
    pub op: String,
    /// The flow that made the call, as `"<type>/<instance>"`.
    pub flow: String,
    /// What the call was about: a transaction id, an order id, `<template>:<subject>` for a mail,
    /// `<bureau>:<application id>` for a credit check (see the module docs).
    pub key: String,
    /// The id of the node the call came from.
    pub node: u64,
    /// Wall-clock time of the call, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The epoch of the activation that made the call, when an activation made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl LedgerEntry {
    /// An entry stamped with the current wall-clock time.
    pub fn new(
        service: impl Into<String>,
        op: impl Into<String>,
        flow: impl Into<String>,
        key: impl Into<String>,
        node: u64,
    ) -> Self {
        LedgerEntry {
            service: service.into(),
            op: op.into(),
            flow: flow.into(),
            key: key.into(),
            node,
            ts_ms: now_ms(),
            epoch: None,
        }
    }

    /// This entry, made by the activation with epoch `epoch`.
    pub fn with_epoch(mut self, epoch: Option<u64>) -> Self {
        self.epoch = epoch;
        self
    }

    /// Whether this entry is a call of `service`'s `op` made by `flow`.
    pub fn matches(&self, service: &str, op: &str, flow: &str) -> bool {
        self.service == service && self.op == op && self.flow == flow
    }
}

/// What can go wrong opening, appending to or reading a ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The ledger file could not be opened or created.
    #[error("cannot open ledger {path}: {source}")]
    Open {
        /// The ledger file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An entry could not be encoded as JSON.
    #[error("cannot encode ledger entry: {0}")]
    Encode(#[source] serde_json::Error),
    /// The append failed.
    #[error("cannot append to ledger {path}: {source}")]
    Write {
        /// The ledger file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The kernel wrote only part of a line (a full disk, say); the ledger now ends with a
    /// fragment that [`Ledger::read_all`] will report.
    #[error("short append to ledger {path}: {written} of {len} bytes")]
    ShortWrite {
        /// The ledger file.
        path: PathBuf,
        /// Bytes written.
        written: usize,
        /// Bytes of the line.
        len: usize,
    },
    /// The ledger file could not be read.
    #[error("cannot read ledger {path}: {source}")]
    Read {
        /// The ledger file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A line is not a ledger entry.
    #[error("ledger {path} line {line}: malformed entry: {source}")]
    Malformed {
        /// The ledger file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// The file ends with a line that has no newline: a write that did not complete.
    #[error("ledger {path} line {line}: incomplete line (no trailing newline)")]
    Incomplete {
        /// The ledger file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
}

/// A handle on a ledger file, opened for appending. Cheap to clone; clones share the file.
///
/// Appends are not fsynced: the ledger counts calls across processes of one machine, and a write
/// that returned is in the page cache, visible to every reader and kept if the writing process is
/// killed.
#[derive(Debug, Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    file: File,
}

impl Ledger {
    /// Opens the ledger at `path` for appending, creating the file if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| LedgerError::Open { path: path.clone(), source })?;
        Ok(Ledger { inner: Arc::new(Inner { path, file }) })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends `entry` as one line, with a single `write` (see the module docs).
    pub fn record(&self, entry: &LedgerEntry) -> Result<(), LedgerError> {
        let mut line = serde_json::to_vec(entry).map_err(LedgerError::Encode)?;
        // JSON escapes control characters inside strings, so the only newline is this one.
        line.push(b'\n');
        loop {
            // `&File` is `Write`: no lock is needed, O_APPEND makes each write land whole at the end.
            match (&self.inner.file).write(&line) {
                Ok(written) if written == line.len() => return Ok(()),
                Ok(written) => {
                    return Err(LedgerError::ShortWrite {
                        path: self.inner.path.clone(),
                        written,
                        len: line.len(),
                    })
                }
                // Interrupted before anything was written: writing again cannot duplicate.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LedgerError::Write { path: self.inner.path.clone(), source }),
            }
        }
    }

    /// Every entry of the ledger at `path`, in file order. A line that is empty, malformed or not
    /// terminated by a newline is an error naming its line number; nothing is skipped.
    pub fn read_all(path: impl AsRef<Path>) -> Result<Vec<LedgerEntry>, LedgerError> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|source| LedgerError::Read { path: path.to_path_buf(), source })?;
        let mut entries = Vec::new();
        let mut rest = bytes.as_slice();
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                return Err(LedgerError::Incomplete { path: path.to_path_buf(), line: line_no });
            };
            let entry = serde_json::from_slice(&rest[..end]).map_err(|source| LedgerError::Malformed {
                path: path.to_path_buf(),
                line: line_no,
                source,
            })?;
            entries.push(entry);
            rest = &rest[end + 1..];
        }
        Ok(entries)
    }
}

/// How many entries are calls of `service`'s `op` made by `flow` (`"<type>/<instance>"`).
pub fn count(entries: &[LedgerEntry], service: &str, op: &str, flow: &str) -> usize {
    entries.iter().filter(|e| e.matches(service, op, flow)).count()
}

/// How many entries are calls of `service`'s `op` made by `flow` about `key`, e.g. the
/// `reminder` mails of a signup: `count_key(entries, "email", "send", "signup/c-1", "reminder:c-1")`.
pub fn count_key(entries: &[LedgerEntry], service: &str, op: &str, flow: &str, key: &str) -> usize {
    entries.iter().filter(|e| e.matches(service, op, flow) && e.key == key).count()
}

/// How many entries are calls of `service`'s `op`, from any flow.
pub fn count_op(entries: &[LedgerEntry], service: &str, op: &str) -> usize {
    entries.iter().filter(|e| e.service == service && e.op == op).count()
}

/// Wall-clock milliseconds since the Unix epoch (0 for a clock set before 1970).
fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::process::{Command, Stdio};

    use super::*;

    /// Tells a re-run of this test binary to act as an appending child (see `child_appender`).
    const CHILD_LEDGER_ENV: &str = "FETTER_EXAMPLES_LEDGER_CHILD";
    const CHILD_ID_ENV: &str = "FETTER_EXAMPLES_LEDGER_CHILD_ID";
    const CHILD_LINES: usize = 2_000;

    /// A key long enough that a torn write would be visible as a broken line.
    fn padded_key(writer: &str, seq: usize) -> String {
        format!("{writer}:{seq}:{}", "x".repeat(200))
    }

    fn parse_key(key: &str) -> (&str, usize) {
        let mut parts = key.splitn(3, ':');
        let writer = parts.next().unwrap();
        let seq = parts.next().unwrap().parse().unwrap();
        assert_eq!(parts.next().unwrap(), "x".repeat(200));
        (writer, seq)
    }

    /// Asserts that each writer's lines are all present and in its own order.
    fn assert_sequences(entries: &[LedgerEntry], writers: usize, per_writer: usize) {
        assert_eq!(entries.len(), writers * per_writer);
        let mut next: HashMap<String, usize> = HashMap::new();
        for e in entries {
            let (writer, seq) = parse_key(&e.key);
            let expected = next.entry(writer.to_owned()).or_insert(0);
            assert_eq!(seq, *expected, "writer {writer} out of order");
            *expected += 1;
        }
        assert_eq!(next.len(), writers);
        assert!(next.values().all(|&n| n == per_writer));
    }

    #[test]
    fn one_line_per_call_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = Ledger::open(&path).unwrap();
        let before = now_ms();
        ledger.record(&LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 3)).unwrap();
        ledger.record(&LedgerEntry::new("payment", "capture", "order/o-1", "tx-1", 3)).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let obj = first.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6);
        assert_eq!(first["service"], "payment");
        assert_eq!(first["op"], "reserve");
        assert_eq!(first["flow"], "order/o-1");
        assert_eq!(first["key"], "tx-1");
        assert_eq!(first["node"], 3);
        assert!(first["ts_ms"].as_u64().unwrap() >= before);

        let entries = Ledger::read_all(&path).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].op, "capture");
        assert_eq!(entries[1].node, 3);
    }

    #[test]
    fn reopening_appends_instead_of_truncating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        Ledger::open(&path)
            .unwrap()
            .record(&LedgerEntry::new("email", "send", "signup/a", "welcome:a", 1))
            .unwrap();
        Ledger::open(&path)
            .unwrap()
            .record(&LedgerEntry::new("email", "send", "signup/b", "welcome:b", 2))
            .unwrap();
        let entries = Ledger::read_all(&path).unwrap();
        assert_eq!(entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["welcome:a", "welcome:b"]);
    }

    #[test]
    fn empty_ledger_reads_as_no_entries() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("ledger.jsonl")).unwrap();
        assert!(Ledger::read_all(ledger.path()).unwrap().is_empty());
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ledger::read_all(dir.path().join("nope.jsonl")).unwrap_err();
        assert!(matches!(err, LedgerError::Read { .. }), "{err}");
    }

    #[test]
    fn strings_with_newlines_stay_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("ledger.jsonl")).unwrap();
        let entry = LedgerEntry::new("email", "send", "newsletter/n\n1", "newsletter:a\nb\r\n", 1);
        ledger.record(&entry).unwrap();
        let text = std::fs::read_to_string(ledger.path()).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        assert_eq!(Ledger::read_all(ledger.path()).unwrap(), [entry]);
    }

    #[test]
    fn malformed_line_is_an_error_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = Ledger::open(&path).unwrap();
        ledger.record(&LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 1)).unwrap();
        ledger.record(&LedgerEntry::new("payment", "capture", "order/o-1", "tx-1", 1)).unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"service\":\"payment\",\"op\":\n").unwrap();
        ledger.record(&LedgerEntry::new("payment", "cancel", "order/o-1", "tx-1", 1)).unwrap();

        let err = Ledger::read_all(&path).unwrap_err();
        assert!(matches!(err, LedgerError::Malformed { line: 3, .. }), "{err}");
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn empty_line_is_an_error_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = Ledger::open(&path).unwrap();
        ledger.record(&LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 1)).unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"\n").unwrap();
        let err = Ledger::read_all(&path).unwrap_err();
        assert!(matches!(err, LedgerError::Malformed { line: 2, .. }), "{err}");
    }

    #[test]
    fn line_without_newline_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let ledger = Ledger::open(&path).unwrap();
        ledger.record(&LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 1)).unwrap();
        let whole =
            serde_json::to_string(&LedgerEntry::new("payment", "capture", "order/o-1", "tx-1", 1)).unwrap();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(whole.as_bytes()).unwrap();
        let err = Ledger::read_all(&path).unwrap_err();
        assert!(matches!(err, LedgerError::Incomplete { line: 2, .. }), "{err}");
    }

    #[test]
    fn counts_by_service_op_and_flow() {
        let entries = vec![
            LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 1),
            LedgerEntry::new("payment", "reserve", "order/o-1", "tx-1", 2),
            LedgerEntry::new("payment", "reserve", "order/o-2", "tx-2", 1),
            LedgerEntry::new("payment", "capture", "order/o-1", "tx-1", 1),
            LedgerEntry::new("logistics", "ship", "order/o-1", "o-1", 1),
            LedgerEntry::new("email", "send", "signup/c-1", "activation:c-1", 1),
            LedgerEntry::new("email", "send", "signup/c-1", "reminder:c-1", 1),
            LedgerEntry::new("email", "send", "signup/c-1", "reminder:c-1", 1),
        ];
        assert_eq!(count(&entries, "payment", "reserve", "order/o-1"), 2);
        assert_eq!(count(&entries, "payment", "reserve", "order/o-2"), 1);
        assert_eq!(count(&entries, "payment", "capture", "order/o-1"), 1);
        assert_eq!(count(&entries, "payment", "cancel", "order/o-1"), 0);
        assert_eq!(count_op(&entries, "payment", "reserve"), 3);
        assert_eq!(count_op(&entries, "logistics", "ship"), 1);
        assert_eq!(count_op(&entries, "logistics", "reserve"), 0);
        assert_eq!(count(&entries, "email", "send", "signup/c-1"), 3);
        assert_eq!(count_key(&entries, "email", "send", "signup/c-1", "reminder:c-1"), 2);
        assert_eq!(count_key(&entries, "email", "send", "signup/c-1", "activation:c-1"), 1);
        assert_eq!(count_key(&entries, "email", "send", "signup/c-1", "welcome:c-1"), 0);
        assert_eq!(count_key(&entries, "email", "send", "signup/c-2", "reminder:c-1"), 0);
    }

    #[test]
    fn ledger_is_clone_send_sync() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<Ledger>();
    }

    #[test]
    fn concurrent_threads_never_interleave() {
        const THREADS: usize = 8;
        const LINES: usize = 500;
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("ledger.jsonl")).unwrap();
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let ledger = ledger.clone();
                scope.spawn(move || {
                    let writer = format!("t{t}");
                    for i in 0..LINES {
                        let entry =
                            LedgerEntry::new("payment", "reserve", "order/o-1", padded_key(&writer, i), 1);
                        ledger.record(&entry).unwrap();
                    }
                });
            }
        });
        let entries = Ledger::read_all(ledger.path()).unwrap();
        assert_sequences(&entries, THREADS, LINES);
    }

    /// Not a test on its own: when re-run by `concurrent_processes_never_interleave` with
    /// `CHILD_LEDGER_ENV` set, appends `CHILD_LINES` lines to that ledger; otherwise does nothing.
    #[test]
    fn child_appender() {
        let (Ok(path), Ok(id)) = (std::env::var(CHILD_LEDGER_ENV), std::env::var(CHILD_ID_ENV)) else {
            return;
        };
        let ledger = Ledger::open(path).unwrap();
        let node: u64 = id.parse().unwrap();
        for i in 0..CHILD_LINES {
            let entry = LedgerEntry::new("logistics", "ship", "order/o-1", padded_key(&id, i), node);
            ledger.record(&entry).unwrap();
        }
    }

    #[test]
    fn concurrent_processes_never_interleave() {
        const CHILDREN: usize = 2;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..CHILDREN)
            .map(|id| {
                Command::new(&exe)
                    .args(["--exact", "ledger::tests::child_appender", "--nocapture", "--test-threads=1"])
                    .env(CHILD_LEDGER_ENV, &path)
                    .env(CHILD_ID_ENV, id.to_string())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "child failed: {:?}\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let entries = Ledger::read_all(&path).unwrap();
        assert_sequences(&entries, CHILDREN, CHILD_LINES);
        for e in &entries {
            assert_eq!(e.key.split(':').next().unwrap(), e.node.to_string());
        }
    }
}
