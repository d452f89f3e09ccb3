//! `shop bench --nodes <n>` / `shop bench --addr <host:port>`: the flow runtime on a real cluster,
//! driven through the public gRPC API from this process (a separate client, as an application
//! would be).
//!
//! With `--nodes n` the benchmark starts its own local cluster: `n` `shop node` processes of this
//! program (production Raft timing, 12 shards, instant fake services, a fresh temp directory,
//! ports from a free range), stopped again at the end, on an error and on Ctrl-C. With `--addr`
//! it uses a running cluster (and cannot kill anything).
//!
//! Phases:
//!
//! 1. warm-up: up to 500 orders at `--concurrency`, not measured;
//! 2. throughput: `--flows` orders at `--concurrency`, each one `StartFlow` with `wait` (its
//!    latency is that call's, retries included) → flows/s, effects/s (5 steps per order: the
//!    captured transaction id and 4 effects), p50/p99;
//! 3. 200 orders one at a time → p50 at concurrency 1;
//! 4. with `--kill k`: load keeps running at `--concurrency` while k rounds of: `kill -9` the
//!    node leading the most shards, measure the failover, restart it, wait until it is ready and
//!    the leaders are even again (at most one apart).
//!
//! **Failover time** is measured with the fake services' ledger (the nodes get `--ledger` only
//! when `--kill` is given): from the moment of the kill (wall clock, just before the signal) to
//! the first ledger entry, written by another node, of an order on a shard the killed node led.
//! An effect call on such a shard means a new leader was elected, applied the log and resumed
//! the flow after its last committed step. The fakes answer at once, so nothing is added to it.
//! The time until `ClusterStatus` reports a new leader for every such shard is shown too.
//!
//! The last line is one JSON object.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fetter::client::ClientError;
use fetter::local::LocalCluster;
use fetter::prelude::FlowId;
use fetter::{proto, Client};
use serde_json::json;

use crate::ledger::LedgerEntry;

/// Steps of one order: the captured transaction id and four effects (as in the embedded bench).
const STEPS_PER_ORDER: u64 = 5;
/// Orders run before measuring.
const WARMUP: u64 = 500;
/// Orders of the concurrency-1 phase.
const SEQUENTIAL: u64 = 200;
/// Bound on one order, retries across a failover included.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);
/// How long one `StartFlow` with `wait` may wait on the node.
const WAIT: Duration = Duration::from_secs(60);
/// Bound on the cluster becoming ready, failover and leaders evening out.
const READY: Duration = Duration::from_secs(60);
/// Load that runs before each kill.
const BEFORE_KILL: Duration = Duration::from_secs(1);

/// `shop bench` on a cluster.
#[derive(Debug, Clone)]
pub(super) struct ClusterBenchOptions {
    /// Start a local cluster of this many nodes.
    pub(super) nodes: Option<u64>,
    /// Or use the cluster at these addresses (comma-separated).
    pub(super) addr: Option<String>,
    /// Orders of the throughput phase.
    pub(super) flows: u64,
    /// Orders in flight.
    pub(super) concurrency: usize,
    /// Kill rounds.
    pub(super) kill: u32,
}

// ---- helpers shared with the demo ----

/// Wall-clock milliseconds since the Unix epoch (the ledger's clock).
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the loopback ports `base..base + n` can all be bound now.
pub(super) fn ports_free(base: u16, n: u64) -> bool {
    (0..n).all(|i| {
        u16::try_from(u64::from(base) + i).is_ok_and(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
    })
}

/// `n` consecutive free loopback ports from a random place in 20000..60000.
pub(super) fn free_ports(n: u64) -> Result<u16> {
    for _ in 0..200 {
        let base: u16 = rand::random_range(20_000..60_000);
        if ports_free(base, n) {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free loopback ports found")
}

/// The node leading the most shards (the lowest id among equals) and the shards it leads.
pub(super) fn busiest_leader(status: &proto::ClusterStatusResponse) -> Result<(u64, Vec<u32>)> {
    let per = status.leaders_per_node();
    let victim = per
        .iter()
        .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
        .map(|(id, _)| *id)
        .ok_or_else(|| anyhow!("no shard has a leader"))?;
    let shards = status.shards.iter().filter(|s| s.leader == Some(victim)).map(|s| s.id).collect();
    Ok((victim, shards))
}

/// Whether every one of `shards` has a leader other than `victim`.
pub(super) fn shards_moved(status: &proto::ClusterStatusResponse, victim: u64, shards: &[u32]) -> bool {
    shards.iter().all(|k| status.shards.iter().any(|s| s.id == *k && s.leader.is_some_and(|l| l != victim)))
}

/// Whether the ledger entry is a call of an `order` flow on one of `shards`.
pub(super) fn order_on_shards(entry: &LedgerEntry, shards: &[u32], shard_count: u32) -> bool {
    entry.flow.strip_prefix("order/").is_some_and(|instance| {
        shards.contains(&fetter::placement::shard_of(&FlowId::new("order", instance), shard_count).0)
    })
}

/// The failover time: milliseconds from `kill_ms` to the first entry, made by a node other than
/// `victim`, of an order on one of `shards`.
pub(super) fn failover_ms<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
    kill_ms: u64,
    victim: u64,
    shards: &[u32],
    shard_count: u32,
) -> Option<u64> {
    entries
        .into_iter()
        .filter(|e| e.ts_ms >= kill_ms && e.node != victim && order_on_shards(e, shards, shard_count))
        .map(|e| e.ts_ms - kill_ms)
        .min()
}

/// Whether a client error may go away by itself (a leader change, a node down, a wait that ran
/// out); the others are the request's fault.
pub(super) fn is_transient(e: &ClientError) -> bool {
    !matches!(
        e,
        ClientError::InvalidArgument(_)
            | ClientError::NotFound(_)
            | ClientError::AlreadyExists(_)
            | ClientError::Json(_)
    )
}

/// Whether a flow status is final.
pub(super) fn is_finished(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// Client errors seen and retried, by message.
#[derive(Debug, Default)]
pub(super) struct Retries {
    count: AtomicU64,
    messages: Mutex<BTreeMap<String, u64>>,
}

impl Retries {
    fn record(&self, e: &ClientError) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut text = e.to_string();
        if let Some((cut, _)) = text.char_indices().nth(140) {
            text.truncate(cut);
            text.push('…');
        }
        if let Ok(mut messages) = self.messages.lock() {
            *messages.entry(text).or_default() += 1;
        }
    }

    /// How many calls failed and were retried.
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The most frequent messages, as text.
    pub(super) fn top_text(&self, n: usize) -> String {
        self.top(n).iter().map(|(m, k)| format!("{k}× {m}")).collect::<Vec<_>>().join("; ")
    }

    /// The most frequent messages, with their counts.
    pub(super) fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .messages
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        all.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        all.truncate(n);
        all
    }
}

/// Calls `call` until it succeeds, retrying transient errors (recorded in `retries`) until
/// `deadline`.
pub(super) async fn retry<T, F, Fut>(
    what: &str,
    deadline: Instant,
    retries: &Retries,
    mut call: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) if is_transient(&e) && Instant::now() < deadline => {
                retries.record(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow!("{what}: {e}")),
        }
    }
}

/// Starts `order/<instance>` with `input` (idempotent) and waits until it has finished; the
/// finished flow.
pub(super) async fn run_order(
    client: &Client,
    instance: &str,
    input: &str,
    retries: &Retries,
) -> Result<proto::Flow> {
    let deadline = Instant::now() + ORDER_DEADLINE;
    let what = format!("order/{instance}");
    loop {
        let response =
            retry(&what, deadline, retries, || client.start_flow("order", instance, input, true, Some(WAIT)))
                .await?;
        match response.flow {
            Some(flow) if is_finished(&flow.status) => return Ok(flow),
            _ if Instant::now() >= deadline => bail!("{what} has not finished within {ORDER_DEADLINE:?}"),
            _ => {}
        }
    }
}

/// `work`'s result, or `None` if Ctrl-C came first.
pub(super) async fn unless_interrupted<T>(work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        r = work => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    }
}

/// Stops every node of `cluster` and returns the outcome of the work done on it: Ctrl-C (`None`)
/// is "interrupted", an error gets the last `lines` lines of every node's log.
pub(super) async fn stop_with(
    cluster: &mut LocalCluster,
    outcome: Option<Result<()>>,
    lines: usize,
) -> Result<()> {
    let result = match outcome {
        None => Err(anyhow!("interrupted")),
        Some(r) => r.map_err(|e| anyhow!("{e:#}\n{}", log_tails(cluster, lines))),
    };
    cluster.stop_all().await;
    result
}

/// The last lines of every node's log (for error messages).
pub(super) fn log_tails(cluster: &LocalCluster, lines: usize) -> String {
    let mut out = String::new();
    for id in cluster.ids() {
        let path = cluster.log_file(id);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        out.push_str(&format!("--- {} (last {} lines) ---\n", path.display(), tail.len()));
        for line in tail.into_iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Milliseconds of a duration, as a float.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    ms(sorted[idx.min(sorted.len() - 1)])
}

/// The entries appended to a ledger file since the last call (complete lines only).
pub(super) struct LedgerTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LedgerTail {
    pub(super) fn new(path: &Path) -> Self {
        LedgerTail { path: path.to_path_buf(), offset: 0, partial: Vec::new() }
    }

    pub(super) fn read_new(&mut self) -> Result<Vec<LedgerEntry>> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Ok(Vec::new()) };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        complete
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).context("a malformed ledger line"))
            .collect()
    }
}

// ---- load ----

/// A stream of orders `<prefix>-<i>` run by `concurrency` workers.
struct Load {
    prefix: String,
    next: AtomicU64,
    end: u64,
    stop: AtomicBool,
    finished: AtomicU64,
    failed: AtomicU64,
    retries: Retries,
    latencies: Mutex<Vec<Duration>>,
    failures: Mutex<BTreeMap<String, u64>>,
}

impl Load {
    fn new(prefix: String, count: u64) -> Arc<Load> {
        Arc::new(Load {
            prefix,
            next: AtomicU64::new(0),
            end: count,
            stop: AtomicBool::new(false),
            finished: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: Retries::default(),
            latencies: Mutex::new(Vec::new()),
            failures: Mutex::new(BTreeMap::new()),
        })
    }

    fn input(instance: &str, i: u64) -> String {
        json!({
            "order_id": instance,
            "customer_id": format!("c-{}", i % 97),
            "total_cents": 100 + i,
            "products": ["p-1"],
        })
        .to_string()
    }

    async fn worker(self: Arc<Self>, client: Client) -> Result<()> {
        while !self.stop.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.end {
                break;
            }
            let instance = format!("{}-{i}", self.prefix);
            let input = Load::input(&instance, i);
            let t0 = Instant::now();
            let flow = run_order(&client, &instance, &input, &self.retries).await?;
            let latency = t0.elapsed();
            if flow.status != "succeeded" {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let kind = format!(
                    "{} {} {}",
                    flow.status,
                    flow.error_kind.as_deref().unwrap_or("-"),
                    flow.error.as_deref().unwrap_or("")
                );
                if let Ok(mut failures) = self.failures.lock() {
                    *failures.entry(kind).or_default() += 1;
                }
            }
            self.finished.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut latencies) = self.latencies.lock() {
                latencies.push(latency);
            }
        }
        Ok(())
    }

    /// Starts the workers, spread over `clients`.
    fn spawn(self: &Arc<Self>, clients: &[Client], concurrency: usize) -> tokio::task::JoinSet<Result<()>> {
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..concurrency {
            let client = clients[w % clients.len()].clone();
            workers.spawn(self.clone().worker(client));
        }
        workers
    }

    /// Runs every order to the end; the latencies, sorted.
    async fn run(self: &Arc<Self>, clients: &[Client], concurrency: usize) -> Result<Vec<Duration>> {
        let mut workers = self.spawn(clients, concurrency);
        while let Some(done) = workers.join_next().await {
            done??;
        }
        Ok(self.sorted_latencies())
    }

    fn sorted_latencies(&self) -> Vec<Duration> {
        let mut all = self.latencies.lock().map(|l| l.clone()).unwrap_or_default();
        all.sort();
        all
    }

    fn failures_text(&self) -> String {
        let failures = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        failures.iter().map(|(k, n)| format!("{n}× {k}")).collect::<Vec<_>>().join("; ")
    }
}

/// One client per node, each trying a different node first, so calls enter the cluster
/// everywhere (a node forwards what it does not lead).
fn clients(addrs: &[String]) -> Result<Vec<Client>> {
    (0..addrs.len())
        .map(|first| {
            let mut rotated = addrs[first..].to_vec();
            rotated.extend_from_slice(&addrs[..first]);
            Client::connect(rotated).map_err(|e| anyhow!("{e}"))
        })
        .collect()
}

// ---- the benchmark ----

/// What the measured phases gave.
struct Figures {
    nodes: usize,
    shards: usize,
    flows_per_s: f64,
    effects_per_s: f64,
    p50: f64,
    p99: f64,
    c1_p50: f64,
    failed: u64,
    retries: u64,
}

/// What the kill rounds gave.
#[derive(Default)]
struct Kills {
    failover: Vec<u64>,
    elected: Vec<Option<u64>>,
    even: Vec<Option<u64>>,
    orders: u64,
    failed: u64,
    shipped_twice: u64,
    retries: u64,
    max_latency_ms: f64,
}

/// Runs the cluster benchmark.
pub(super) async fn bench(opts: ClusterBenchOptions) -> Result<()> {
    let run_id = format!("{:x}", now_ms() % 0x1_0000_0000);
    match opts.nodes {
        Some(nodes) => {
            if nodes == 0 {
                bail!("--nodes must be at least 1");
            }
            if opts.kill > 0 && nodes < 3 {
                bail!("--kill needs at least 3 nodes (with fewer, a killed node takes the majority with it)");
            }
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            let dir = tempfile::Builder::new().prefix("shop-bench-").tempdir()?;
            let ledger = (opts.kill > 0).then(|| dir.path().join("ledger.jsonl"));
            let mut node_args = Vec::new();
            if let Some(ledger) = &ledger {
                node_args = vec!["--ledger".to_string(), ledger.display().to_string()];
            }
            let base = free_ports(nodes)?;
            let mut cluster = LocalCluster::new(exe, dir.path().join("cluster"), nodes)
                .base_port(base)
                .timing("production")
                .node_args(node_args);
            let outcome =
                unless_interrupted(run_local(&mut cluster, &opts, ledger.as_deref(), &run_id)).await;
            stop_with(&mut cluster, outcome, 15).await
        }
        None => {
            if opts.kill > 0 {
                bail!("--kill needs a cluster this command starts itself (--nodes), not --addr");
            }
            let addr = opts.addr.clone().unwrap_or_default();
            let addrs: Vec<String> =
                addr.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect();
            if addrs.is_empty() {
                bail!("--addr names no node");
            }
            let clients = clients(&addrs)?;
            tokio::select! {
                r = async {
                    let figures = measure(&clients, &opts, &run_id).await?;
                    report(&figures, &opts, None);
                    Ok(())
                } => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            }
        }
    }
}

async fn run_local(
    cluster: &mut LocalCluster,
    opts: &ClusterBenchOptions,
    ledger: Option<&Path>,
    run_id: &str,
) -> Result<()> {
    cluster.start_all().await.map_err(|e| anyhow!(e))?;
    cluster.wait_ready(READY).await.map_err(|e| anyhow!(e))?;
    let clients = clients(&cluster.addrs())?;
    // Start measuring with leaders spread as they will be.
    let even = wait_leaders_even(&clients[0], cluster.ids().len(), READY).await;
    if even.is_none() {
        println!("  warning: leaders are not even after {READY:?}");
    }
    let figures = measure(&clients, opts, run_id).await?;
    let kills = match ledger {
        Some(ledger) if opts.kill > 0 => {
            Some(kill_rounds(cluster, &clients, opts, ledger, figures.shards as u32, run_id).await?)
        }
        _ => None,
    };
    report(&figures, opts, kills.as_ref());
    Ok(())
}

/// Phases 1–3.
async fn measure(clients: &[Client], opts: &ClusterBenchOptions, run_id: &str) -> Result<Figures> {
    let status = clients[0].cluster_status().await?;
    let (nodes, shards) = (status.members.len(), status.shards.len());
    println!(
        "shop bench: {nodes} node(s), {shards} shards, via gRPC from this process; {} orders at concurrency {} (run {run_id})",
        opts.flows, opts.concurrency
    );
    let warmup = Load::new(format!("w{run_id}"), WARMUP.min(opts.flows));
    warmup.run(clients, opts.concurrency).await?;

    let load = Load::new(format!("b{run_id}"), opts.flows);
    let t0 = Instant::now();
    let latencies = load.run(clients, opts.concurrency).await?;
    let elapsed = t0.elapsed().as_secs_f64();
    let flows_per_s = opts.flows as f64 / elapsed;
    let effects_per_s = flows_per_s * STEPS_PER_ORDER as f64;
    let (p50, p99) = (percentile_ms(&latencies, 0.50), percentile_ms(&latencies, 0.99));
    let failed = load.failed.load(Ordering::Relaxed);
    println!(
        "  {flows_per_s:.0} flows/s, {effects_per_s:.0} effects/s; latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.1} ms ({elapsed:.1} s)",
        latencies.last().map_or(0.0, |d| ms(*d))
    );
    if failed > 0 {
        println!("  warning: {failed} orders did not succeed: {}", load.failures_text());
    }

    let sequential = Load::new(format!("s{run_id}"), SEQUENTIAL);
    let c1 = sequential.run(&clients[..1], 1).await?;
    let c1_p50 = percentile_ms(&c1, 0.50);
    println!("  concurrency 1: p50 {c1_p50:.2} ms, p99 {:.2} ms", percentile_ms(&c1, 0.99));
    let retries = warmup.retries.count() + load.retries.count() + sequential.retries.count();
    if retries > 0 {
        let texts = [&warmup, &load, &sequential].map(|l| l.retries.top_text(3));
        let texts: Vec<&str> = texts.iter().map(String::as_str).filter(|t| !t.is_empty()).collect();
        println!("  {retries} client calls retried: {}", texts.join("; "));
    }
    Ok(Figures {
        nodes,
        shards,
        flows_per_s,
        effects_per_s,
        p50,
        p99,
        c1_p50,
        failed: failed + sequential.failed.load(Ordering::Relaxed),
        retries,
    })
}

/// Waits until every shard has a leader and the live nodes lead at most one shard more than each
/// other; how long it took (ms), or `None` when not within `within`.
async fn wait_leaders_even(client: &Client, nodes: usize, within: Duration) -> Option<u64> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Ok(status) = client.cluster_status().await {
            let per = status.leaders_per_node();
            let (min, max) =
                (per.values().min().copied().unwrap_or(0), per.values().max().copied().unwrap_or(0));
            let led = status.shards.iter().all(|s| s.leader.is_some());
            if per.len() == nodes && led && max - min <= 1 {
                return Some(u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Phase 4.
async fn kill_rounds(
    cluster: &mut LocalCluster,
    clients: &[Client],
    opts: &ClusterBenchOptions,
    ledger: &Path,
    shard_count: u32,
    run_id: &str,
) -> Result<Kills> {
    println!("  {} kill rounds with orders running at concurrency {}:", opts.kill, opts.concurrency);
    let nodes = cluster.ids().len();
    let mut tail = LedgerTail::new(ledger);
    tail.read_new()?;
    let load = Load::new(format!("k{run_id}"), u64::MAX);
    let mut workers = load.spawn(clients, opts.concurrency);
    let mut kills = Kills::default();
    // Status polls must not hang on a busy node while the failover is timed.
    let status_client = clients[clients.len() - 1].clone().with_timeout(Duration::from_secs(2));
    let rounds = async {
        for round in 1..=opts.kill {
            tokio::time::sleep(BEFORE_KILL).await;
            let status = clients[0].cluster_status().await?;
            let (victim, shards) = busiest_leader(&status)?;
            tail.read_new()?;
            let kill_ms = now_ms();
            let killed = Instant::now();
            cluster.kill(victim).await.map_err(|e| anyhow!(e))?;
            // Until a node other than the victim makes progress on one of its shards (and, for
            // at most 15 s, until the cluster reports new leaders for all of them).
            let (mut elected, mut failover) = (None, None);
            while failover.is_none() || (elected.is_none() && killed.elapsed() < Duration::from_secs(15)) {
                if killed.elapsed() > READY {
                    bail!(
                        "round {round}: shards {shards:?} of node {victim} made no progress within {READY:?}"
                    );
                }
                if elected.is_none() {
                    if let Ok(status) = status_client.cluster_status().await {
                        if shards_moved(&status, victim, &shards) {
                            elected = Some(u64::try_from(killed.elapsed().as_millis()).unwrap_or(u64::MAX));
                        }
                    }
                }
                if failover.is_none() {
                    failover = failover_ms(&tail.read_new()?, kill_ms, victim, &shards, shard_count);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let failover = failover.unwrap_or_default();
            cluster.start(victim).await.map_err(|e| anyhow!(e))?;
            cluster.wait_ready(READY).await.map_err(|e| anyhow!("round {round}: {e}"))?;
            let back = killed.elapsed();
            let even = wait_leaders_even(&clients[0], nodes, READY).await;
            println!(
                "    round {round}: kill -9 node {victim} (led shards {shards:?}): failover {failover} ms (new leaders seen after {}); restarted, ready after {:.1} s, leaders even {}",
                elected.map_or_else(|| "-".to_string(), |ms| format!("{ms} ms")),
                back.as_secs_f64(),
                even.map_or_else(|| format!("NOT within {READY:?}"), |ms| format!("after {ms} ms more"))
            );
            kills.failover.push(failover);
            kills.elected.push(elected);
            kills.even.push(even);
        }
        Ok::<_, anyhow::Error>(())
    };
    // A worker that fails (an order that never finishes) ends the rounds.
    let outcome = tokio::select! {
        r = rounds => r,
        Some(Ok(Err(e))) = workers.join_next() => Err(e),
    };
    load.stop.store(true, Ordering::Relaxed);
    outcome?;
    while let Some(done) = workers.join_next().await {
        done??;
    }
    kills.orders = load.finished.load(Ordering::Relaxed);
    kills.failed = load.failed.load(Ordering::Relaxed);
    kills.retries = load.retries.count();
    kills.max_latency_ms = load.sorted_latencies().last().map_or(0.0, |d| ms(*d));
    // No order of this phase may have shipped twice.
    let mut ships: BTreeMap<String, u64> = BTreeMap::new();
    let entries = crate::ledger::Ledger::read_all(ledger)?;
    for e in entries.iter().filter(|e| e.service == "logistics" && e.op == "ship") {
        *ships.entry(e.flow.clone()).or_default() += 1;
    }
    kills.shipped_twice = ships.values().filter(|n| **n > 1).count() as u64;
    println!(
        "  kill phase: {} orders finished, {} did not succeed{}; slowest {:.0} ms; {} client calls retried{}",
        kills.orders,
        kills.failed,
        if kills.failed > 0 { format!(" ({})", load.failures_text()) } else { String::new() },
        kills.max_latency_ms,
        kills.retries,
        if kills.retries > 0 { format!(": {}", load.retries.top_text(3)) } else { String::new() },
    );
    if kills.shipped_twice > 0 {
        println!("  WARNING: {} orders shipped more than once!", kills.shipped_twice);
    }
    Ok(kills)
}

fn report(figures: &Figures, opts: &ClusterBenchOptions, kills: Option<&Kills>) {
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let (failover_p50, failover_max) = match kills {
        Some(k) if !k.failover.is_empty() => {
            let mut sorted = k.failover.clone();
            sorted.sort_unstable();
            let p50 = sorted[(sorted.len() - 1).div_ceil(2)];
            (json!(p50), json!(sorted.last().copied()))
        }
        _ => (json!(null), json!(null)),
    };
    if let Some(k) = kills {
        println!("  failover p50 {failover_p50} ms, max {failover_max} ms over {} kills", k.failover.len());
    }
    let mut doc = json!({
        "nodes": figures.nodes,
        "shards": figures.shards,
        "flows": opts.flows,
        "concurrency": opts.concurrency,
        "flows_per_s": round1(figures.flows_per_s),
        "effects_per_s": round1(figures.effects_per_s),
        "p50_ms": round3(figures.p50),
        "p99_ms": round3(figures.p99),
        "c1_p50_ms": round3(figures.c1_p50),
        "failed": figures.failed,
        "retries": figures.retries,
        "kills": kills.map_or(0, |k| k.failover.len()),
        "failover_p50_ms": failover_p50,
        "failover_max_ms": failover_max,
    });
    if let (Some(k), Some(map)) = (kills, doc.as_object_mut()) {
        map.insert("failover_ms".into(), json!(k.failover));
        map.insert("new_leaders_ms".into(), json!(k.elected));
        map.insert("leaders_even_ms".into(), json!(k.even));
        map.insert("kill_phase_orders".into(), json!(k.orders));
        map.insert("kill_phase_failed".into(), json!(k.failed));
        map.insert("kill_phase_retries".into(), json!(k.retries));
        map.insert("kill_phase_max_latency_ms".into(), json!(round1(k.max_latency_ms)));
        map.insert("shipped_twice".into(), json!(k.shipped_twice));
    }
    println!("{doc}");
}
