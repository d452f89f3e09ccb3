//! A power cut, replayed from a trace of real writes: a `shop-node` process runs orders under
//! `tests/powercut/trace.c` (an `LD_PRELOAD` library that records every write, truncation,
//! creation, rename, unlink and sync of the files in its data directory, in the order the calls
//! returned) and is killed with `kill -9` while orders are in flight. The test then rebuilds the
//! directory as a power cut at a point of the trace would have left it — keeping only what a sync
//! made durable before that point: a file's bytes once it is fsynced, a directory entry once its
//! directory is, everything on `syncfs`; `sync_file_range` keeps nothing — and starts a node on
//! it. At each cut: every start and every result acknowledged to a client before the cut is
//! there, unchanged; the log has no hole (the node starts and its shards elect); every flow
//! finishes. Then a byte flipped inside the write-ahead log is refused at start-up, not replayed.
//!
//! The trace and the rebuilt directories of a failed run are kept; the test prints where.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fetter::local::LocalCluster;
use fetter_tests::{free_ports, order_input, wait_all_finished, WAIT};

const EXE: &str = env!("CARGO_BIN_EXE_shop-node");
const WORKERS: usize = 8;
/// Acknowledged orders after which the node is killed (with every worker's next one in flight).
const ACKED_BEFORE_KILL: usize = 240;
/// Cut points inside the trace, besides its end.
const CUTS: usize = 5;

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// What a client was told, and when.
#[derive(Debug, Clone)]
struct Ack {
    instance: String,
    at_ns: u64,
    /// The finished flow's status and output, when the call waited for it.
    finished: Option<(String, Option<String>)>,
}

// ---- the trace -------------------------------------------------------------------------------

const OP_CREATE: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_TRUNCATE: u8 = 3;
const OP_FSYNC: u8 = 4;
const OP_SYNCFS: u8 = 5;
const OP_UNLINK: u8 = 6;
const OP_RENAME: u8 = 7;
const OP_MKDIR: u8 = 8;
const OP_SYNC_FILE_RANGE: u8 = 9;
const OP_RMDIR: u8 = 10;
const FLAG_TRUNCATED: u8 = 1;

#[derive(Debug)]
struct Op {
    op: u8,
    at_ns: u64,
    arg: u64,
    flags: u8,
    path: String,
    to: String,
    data: Vec<u8>,
}

fn parse_trace(bytes: &[u8]) -> Result<Vec<Op>> {
    fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8]> {
        let out = b.get(*at..*at + n).ok_or_else(|| anyhow!("trace cut short at byte {}", *at))?;
        *at += n;
        Ok(out)
    }
    fn u32_at(b: &[u8], at: &mut usize) -> Result<u32> {
        Ok(u32::from_le_bytes(take(b, at, 4)?.try_into()?))
    }
    fn u64_at(b: &[u8], at: &mut usize) -> Result<u64> {
        Ok(u64::from_le_bytes(take(b, at, 8)?.try_into()?))
    }
    let mut ops = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u32_at(bytes, &mut at)? as usize;
        let end = at + len;
        let op = take(bytes, &mut at, 1)?[0];
        let at_ns = u64_at(bytes, &mut at)?;
        let arg = u64_at(bytes, &mut at)?;
        let flags = take(bytes, &mut at, 1)?[0];
        let n = u32_at(bytes, &mut at)? as usize;
        let path = String::from_utf8(take(bytes, &mut at, n)?.to_vec())?;
        let n = u32_at(bytes, &mut at)? as usize;
        let to = String::from_utf8(take(bytes, &mut at, n)?.to_vec())?;
        ensure!(at <= end, "trace record longer than its length");
        let rest = end - at;
        let data = take(bytes, &mut at, rest)?.to_vec();
        ops.push(Op { op, at_ns, arg, flags, path, to, data });
    }
    Ok(ops)
}

// ---- the disk as a power cut leaves it ---------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Node {
    File(usize),
    Dir,
}

/// The files under the traced directory: what the page cache holds (`cur`) and what a sync made
/// durable (`dur`), for file contents (per inode) and directory entries (per path).
#[derive(Default)]
struct Disk {
    cur_data: Vec<Vec<u8>>,
    dur_data: Vec<Vec<u8>>,
    cur: BTreeMap<String, Node>,
    dur: BTreeMap<String, Node>,
    /// The inode an unlinked path had (an open file may still be written and synced).
    unlinked: HashMap<String, usize>,
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

impl Disk {
    fn inode(&self, path: &str) -> Option<usize> {
        if let Some(gone) = path.strip_suffix(" (deleted)") {
            return self.unlinked.get(gone).copied();
        }
        match self.cur.get(path) {
            Some(Node::File(i)) => Some(*i),
            _ => None,
        }
    }

    fn file(&mut self, path: &str) -> Result<usize> {
        self.inode(path).ok_or_else(|| anyhow!("trace writes {path}, which it never created"))
    }

    fn apply(&mut self, op: &Op) -> Result<()> {
        match op.op {
            OP_CREATE => match self.inode(&op.path) {
                Some(i) if op.flags & FLAG_TRUNCATED != 0 => self.cur_data[i].clear(),
                Some(_) => {}
                None => {
                    self.cur_data.push(Vec::new());
                    self.dur_data.push(Vec::new());
                    self.cur.insert(op.path.clone(), Node::File(self.cur_data.len() - 1));
                }
            },
            OP_WRITE => {
                let i = self.file(&op.path)?;
                let data = &mut self.cur_data[i];
                let from = op.arg as usize;
                if data.len() < from + op.data.len() {
                    data.resize(from + op.data.len(), 0);
                }
                data[from..from + op.data.len()].copy_from_slice(&op.data);
            }
            OP_TRUNCATE => {
                let i = self.file(&op.path)?;
                self.cur_data[i].resize(op.arg as usize, 0);
            }
            OP_FSYNC => {
                if self.cur.get(&op.path) == Some(&Node::Dir) {
                    let dir = op.path.as_str();
                    let now: Vec<(String, Node)> = self
                        .cur
                        .iter()
                        .filter(|(p, _)| parent(p) == dir)
                        .map(|(p, n)| (p.clone(), n.clone()))
                        .collect();
                    self.dur.retain(|p, _| parent(p) != dir);
                    self.dur.extend(now);
                } else {
                    let i = self.file(&op.path)?;
                    self.dur_data[i] = self.cur_data[i].clone();
                }
            }
            OP_SYNCFS => {
                self.dur = self.cur.clone();
                self.dur_data = self.cur_data.clone();
            }
            OP_UNLINK => {
                if let Some(Node::File(i)) = self.cur.remove(&op.path) {
                    self.unlinked.insert(op.path.clone(), i);
                }
            }
            OP_RMDIR => {
                self.cur.remove(&op.path);
            }
            OP_RENAME => {
                let moved: Vec<(String, Node)> = self
                    .cur
                    .iter()
                    .filter(|(p, _)| **p == op.path || p.starts_with(&format!("{}/", op.path)))
                    .map(|(p, n)| (p.clone(), n.clone()))
                    .collect();
                for (p, n) in moved {
                    self.cur.remove(&p);
                    self.cur.insert(format!("{}{}", op.to, &p[op.path.len()..]), n);
                }
            }
            OP_MKDIR => {
                self.cur.insert(op.path.clone(), Node::Dir);
            }
            OP_SYNC_FILE_RANGE => {}
            other => bail!("unknown trace op {other}"),
        }
        Ok(())
    }

    /// Writes what survives the cut under `to` (the traced root `root` is taken as durable: the
    /// operator created it). Returns the files written.
    fn materialize(&self, root: &str, to: &Path) -> Result<usize> {
        std::fs::create_dir_all(to)?;
        let mut files = 0;
        for (path, node) in &self.dur {
            let Some(rel) = path.strip_prefix(&format!("{root}/")) else { continue };
            // Reachable only if every directory above it is durably there.
            let mut up = parent(path);
            let mut reachable = true;
            while up != root {
                if self.dur.get(up) != Some(&Node::Dir) {
                    reachable = false;
                    break;
                }
                up = parent(up);
            }
            if !reachable {
                continue;
            }
            match node {
                Node::Dir => std::fs::create_dir_all(to.join(rel))?,
                Node::File(i) => {
                    if let Some(p) = to.join(rel).parent() {
                        std::fs::create_dir_all(p)?;
                    }
                    std::fs::write(to.join(rel), &self.dur_data[*i])?;
                    files += 1;
                }
            }
        }
        Ok(files)
    }
}

// ---- the test ----------------------------------------------------------------------------------

fn build_shim(dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("powercut/trace.c");
    let out = dir.join("libfettertrace.so");
    let status = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .args(["-ldl", "-lpthread"])
        .status()
        .context("running gcc to build the trace library (install gcc)")?;
    ensure!(status.success(), "gcc failed to build {}", src.display());
    Ok(out)
}

fn node_log(local: &LocalCluster) -> String {
    std::fs::read_to_string(local.log_file(1)).unwrap_or_default()
}

/// Runs orders from `WORKERS` clients (half wait for the result, half only for the start) until
/// `ACKED_BEFORE_KILL` were acknowledged, then `kill -9`s the node with the next ones in flight.
async fn run_and_kill(local: &mut LocalCluster) -> Result<Vec<Ack>> {
    let client = local.client().map_err(|e| anyhow!(e))?;
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (client, acks, killed) = (client.clone(), acks.clone(), killed.clone());
        workers.push(tokio::spawn(async move {
            for i in 0u32.. {
                if killed.load(Ordering::SeqCst) {
                    break;
                }
                let instance = format!("pc-{w}-{i}");
                let wait = w % 2 == 0;
                let input = order_input(w as u32 * 10_000 + i);
                match client.start_flow("order", &instance, &input, wait, Some(Duration::from_secs(30))).await
                {
                    Ok(resp) => {
                        let at_ns = now_ns();
                        let finished = if wait {
                            let flow =
                                resp.flow.ok_or_else(|| anyhow!("{instance}: no flow in the answer"))?;
                            Some((flow.status, flow.output_json))
                        } else {
                            None
                        };
                        acks.lock().expect("acks").push(Ack { instance, at_ns, finished });
                    }
                    Err(e) if killed.load(Ordering::SeqCst) => {
                        let _ = e;
                        break;
                    }
                    Err(e) => return Err(anyhow!("{instance} before the kill: {e}")),
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while acks.lock().expect("acks").len() < ACKED_BEFORE_KILL {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "orders were not acknowledged in time\n{}",
            node_log(local)
        );
        if let Some(done) = workers.iter().position(|w| w.is_finished()) {
            let worker = workers.remove(done);
            worker.await??;
            bail!("a worker stopped before the kill");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.store(true, Ordering::SeqCst);
    local.kill(1).await.map_err(|e| anyhow!(e))?;
    for w in workers {
        tokio::time::timeout(WAIT, w).await.context("a worker did not stop after the kill")???;
    }
    let acks = acks.lock().expect("acks").clone();
    Ok(acks)
}

/// Starts a node on the directory a cut left and checks it against what was acknowledged.
async fn check_cut(
    name: &str,
    cut_ns: u64,
    cluster_dir: &Path,
    base: u16,
    node_args: &[String],
    acks: &[Ack],
) -> Result<()> {
    let mut local = LocalCluster::new(EXE, cluster_dir, 1)
        .base_port(base)
        .shards(2)
        .timing("relaxed")
        .node_args(node_args.to_vec());
    local.start_all().await.map_err(|e| anyhow!(e))?;
    let result = async {
        local.wait_ready(WAIT).await.map_err(|e| anyhow!("{e}"))?;
        let client = local.client().map_err(|e| anyhow!(e))?;
        let owed: Vec<&Ack> = acks.iter().filter(|a| a.at_ns < cut_ns).collect();
        for ack in &owed {
            let flow = client
                .get_flow("order", &ack.instance)
                .await
                .map_err(|e| anyhow!("{name}: acknowledged start of {} lost: {e}", ack.instance))?;
            if let Some((status, output)) = &ack.finished {
                ensure!(
                    &flow.status == status && &flow.output_json == output,
                    "{name}: {} was answered {status} {output:?}, after the cut it is {} {:?}",
                    ack.instance,
                    flow.status,
                    flow.output_json
                );
            }
        }
        // Everything that is there (acknowledged or not) finishes.
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = client.list_flows(Some("order"), None, 500, cursor.as_deref()).await?;
            all.extend(page.flows.iter().map(|f| f.instance.clone()));
            match page.next {
                Some(next) if !next.is_empty() => cursor = Some(next),
                _ => break,
            }
        }
        // An order cut while its shipment (at most once) was in flight fails as unknown, as the
        // contract says; every other one succeeds.
        let finished = wait_all_finished(&client, "order", &all).await?;
        let unknown = |f: &&fetter::proto::Flow| f.error_kind.as_deref() == Some("effect_outcome_unknown");
        let cut_in_shipment = finished.iter().filter(unknown).count();
        let not_ok: Vec<String> = finished
            .iter()
            .filter(|f| f.status != "succeeded" && !unknown(f))
            .map(|f| format!("{} {} {:?}", f.instance, f.status, f.error))
            .collect();
        ensure!(not_ok.is_empty(), "{name}: orders did not succeed after recovery: {not_ok:?}");
        println!(
            "{name}: {} acknowledged before the cut all there; {} flows on disk, all finished \
             ({cut_in_shipment} cut in a shipment: effect_outcome_unknown)",
            owed.len(),
            all.len()
        );
        Ok(())
    }
    .await;
    let log = node_log(&local);
    local.stop_all().await;
    result.map_err(|e| anyhow!("{e:#}\n--- node log ---\n{}", tail(&log, 40)))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_a_power_cut_at_any_sync_point() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let outcome = power_cut(dir.path()).await;
    if outcome.is_err() {
        let kept = dir.keep();
        println!("trace and rebuilt directories kept in {}", kept.display());
    }
    outcome
}

async fn power_cut(dir: &Path) -> Result<()> {
    let shim = build_shim(dir)?;
    let base = free_ports(1)?;
    let traced = dir.join("traced");
    let ledger = dir.join("ledger.jsonl");
    let node_args: Vec<String> = vec![
        "--ledger".into(),
        ledger.display().to_string(),
        // Snapshots (checkpoints of the state, then purges of the log) during the run.
        "--snapshot-after-entries".into(),
        "200".into(),
    ];
    let trace_file = dir.join("trace.bin");
    let mut local = LocalCluster::new(EXE, &traced, 1)
        .base_port(base)
        .shards(2)
        .timing("relaxed")
        .node_args(node_args.clone())
        .env("LD_PRELOAD", shim.display().to_string())
        .env("FETTER_TRACE_OUT", trace_file.display().to_string());
    // The operator creates the data directory; everything in it is the node's to make durable.
    std::fs::create_dir_all(local.node_dir(1))?;
    let root = std::fs::canonicalize(local.node_dir(1))?.display().to_string();
    local = local.env("FETTER_TRACE_PREFIX", root.clone());
    local.start_all().await.map_err(|e| anyhow!(e))?;
    local.wait_ready(WAIT).await.map_err(|e| anyhow!("{e}\n{}", node_log(&local)))?;
    let acks = run_and_kill(&mut local).await?;
    let ops = parse_trace(&std::fs::read(&trace_file)?)?;
    let syncs: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o.op, OP_FSYNC | OP_SYNCFS))
        .map(|(i, _)| i)
        .collect();
    let wal_syncs = ops.iter().filter(|o| o.op == OP_FSYNC && o.path.contains("/wal/")).count();
    let state_syncs = ops.iter().filter(|o| o.op == OP_FSYNC && o.path.contains("/state")).count();
    println!(
        "{} acknowledgements ({} with the result); trace: {} operations, {} syncs ({} of the log, {} of the state)",
        acks.len(),
        acks.iter().filter(|a| a.finished.is_some()).count(),
        ops.len(),
        syncs.len(),
        wal_syncs,
        state_syncs
    );
    ensure!(syncs.len() > CUTS * 4, "too few syncs in the trace to cut at");
    ensure!(state_syncs > 0, "no checkpoint of the state in the trace (snapshots did not run)");
    // Cut right after a sync spread over the run, and at the very end (the kill).
    let mut cuts: Vec<usize> = (1..=CUTS).map(|k| syncs[k * syncs.len() / (CUTS + 1)]).collect();
    cuts.push(ops.len() - 1);
    let mut disk = Disk::default();
    disk.cur.insert(root.clone(), Node::Dir);
    disk.dur.insert(root.clone(), Node::Dir);
    let mut applied = 0;
    let mut last_dir = PathBuf::new();
    for (k, cut) in cuts.iter().enumerate() {
        while applied <= *cut {
            disk.apply(&ops[applied]).with_context(|| format!("trace operation {applied}"))?;
            applied += 1;
        }
        let name = format!("cut {k} (after trace operation {cut} of {})", ops.len());
        let cluster_dir = dir.join(format!("cut-{k}"));
        let files = disk.materialize(&root, &cluster_dir.join("node-1"))?;
        ensure!(files > 0, "{name}: nothing durable");
        // A scratch ledger: the services' calls of a recovery are not the run's.
        let mut args = node_args.clone();
        args[1] = cluster_dir.join("ledger.jsonl").display().to_string();
        // At the end of the trace the node was dead: every acknowledgement came before.
        let cut_ns = if *cut + 1 == ops.len() { u64::MAX } else { ops[*cut].at_ns };
        check_cut(&name, cut_ns, &cluster_dir, base, &args, &acks).await?;
        last_dir = cluster_dir;
    }

    // A flipped byte inside the log (records written after it) is refused at start-up.
    let segment = std::fs::read_dir(last_dir.join("node-1/wal"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
        .ok_or_else(|| anyhow!("no write-ahead log segment"))?;
    let mut bytes = std::fs::read(&segment)?;
    ensure!(bytes.len() > 4096, "segment too short to damage in the middle");
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(&segment, &bytes)?;
    let mut local = LocalCluster::new(EXE, &last_dir, 1)
        .base_port(base)
        .shards(2)
        .timing("relaxed")
        .node_args(node_args.clone());
    local.start_all().await.map_err(|e| anyhow!(e))?;
    let code = local.wait_exit(1, WAIT).await.map_err(|e| anyhow!(e))?;
    let log = node_log(&local);
    ensure!(code.is_some_and(|c| c != 0), "a node on a damaged log exited with {code:?}\n{}", tail(&log, 20));
    ensure!(
        log.contains("corrupt") && log.contains(&segment.display().to_string()),
        "the refusal does not name the damage\n{}",
        tail(&log, 20)
    );
    ensure!(std::fs::read(&segment)? == bytes, "the damaged segment was changed");
    println!("a flipped byte at offset {at} of {}: refused", segment.display());
    Ok(())
}
