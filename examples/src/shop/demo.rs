//! `shop demo`: the whole story on a real 3-node cluster on this machine.
//!
//! Wipes `--data-dir` (default `./data/demo`; only a directory that holds nothing but a demo's
//! `node-*` and `ledger.jsonl`), starts three `shop node` processes of this program on ports
//! `--base-port`.. (production Raft timing, 12 shards, fake services that take 20 ms and append
//! every call to `<data-dir>/ledger.jsonl`), and submits `--orders` `order` flows through the
//! gRPC client with at most `--concurrency` in flight, showing progress on stderr. Once half of
//! them have finished it `kill -9`s the node leading the most shards, keeps going, restarts that
//! node `--restart-after-secs` later, waits until every order has finished and prints:
//!
//! - orders succeeded, and failed by error kind — an order whose shipment was interrupted by the
//!   kill fails with `effect_outcome_unknown` on `ship` (shipping is at most once) — with the
//!   CLI commands that repair one;
//! - shipments per order according to the ledger (never more than one);
//! - the failover time: from the kill to the first ledger entry of an order on a shard the
//!   killed node led (written by another node);
//! - throughput.
//!
//! Every node is stopped on every way out: success, error and Ctrl-C (and the nodes stop by
//! themselves if this process dies).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fetter::local::LocalCluster;
use fetter::{proto, Client};

use super::cluster_bench::{
    busiest_leader, failover_ms, log_tails, now_ms, ports_free, retry, run_order, shards_moved, Retries,
};
use crate::ledger::{Ledger, LedgerEntry};

const NODES: u64 = 3;
const SERVICE_LATENCY_MS: u64 = 20;
const READY: Duration = Duration::from_secs(60);
const BAR_WIDTH: usize = 30;

/// `shop demo` options.
#[derive(Debug, Clone)]
pub(super) struct DemoOptions {
    /// Orders to run.
    pub(super) orders: u32,
    /// Node 1's port; node i listens on base + i - 1.
    pub(super) base_port: u16,
    /// Wiped, then holds the nodes' data, their logs and the ledger.
    pub(super) data_dir: PathBuf,
    /// Orders in flight at most.
    pub(super) concurrency: usize,
    /// How long the killed node stays down.
    pub(super) restart_after: Duration,
}

/// Counters the workers update and the progress line shows.
#[derive(Default)]
struct Progress {
    submitted: AtomicU64,
    finished: AtomicU64,
    failed: AtomicU64,
    retries: Retries,
    failures: Mutex<Vec<proto::Flow>>,
}

/// The progress line on stderr: rewritten in place on a terminal, a line every 2 s otherwise.
struct Line {
    tty: bool,
    width: usize,
    last: Option<Instant>,
}

impl Line {
    fn new() -> Self {
        Line { tty: std::io::stderr().is_terminal(), width: 0, last: None }
    }

    fn draw(&mut self, progress: &Progress, orders: u64, t0: Instant) {
        if !self.tty && self.last.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) {
            return;
        }
        self.last = Some(Instant::now());
        let submitted = progress.submitted.load(Ordering::Relaxed);
        let finished = progress.finished.load(Ordering::Relaxed);
        let failed = progress.failed.load(Ordering::Relaxed);
        let done = (finished as usize * BAR_WIDTH) / (orders.max(1) as usize);
        let bar: String = (0..BAR_WIDTH).map(|i| if i < done { '#' } else { '.' }).collect();
        let line = format!(
            "[{bar}] submitted {submitted}/{orders}  finished {finished} (failed {failed})  {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        if self.tty {
            eprint!("\r{line:<width$}", width = self.width);
            self.width = line.chars().count();
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }

    /// Prints `message` on a line of its own (above the progress line).
    fn event(&mut self, message: &str) {
        self.clear();
        eprintln!("{message}");
    }

    fn clear(&mut self) {
        if self.tty && self.width > 0 {
            eprint!("\r{:width$}\r", "", width = self.width);
            self.width = 0;
        }
    }
}

/// The kill of one node and what followed.
struct Kill {
    victim: u64,
    shards: Vec<u32>,
    at_ms: u64,
    at: Instant,
    elected_after: Option<Duration>,
    restarted: bool,
}

/// Runs the demo; every node is stopped whatever happens.
pub(super) async fn demo(opts: DemoOptions) -> Result<()> {
    if opts.orders == 0 {
        bail!("--orders must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    if !ports_free(opts.base_port, NODES) {
        bail!(
            "ports {}..{} are not all free (another demo or `shop dev` running?); pass --base-port",
            opts.base_port,
            u64::from(opts.base_port) + NODES - 1
        );
    }
    wipe(&opts.data_dir)?;
    let ledger = opts.data_dir.join("ledger.jsonl");
    Ledger::open(&ledger).context("creating the ledger")?;
    let node_args = vec![
        "--ledger".to_string(),
        ledger.display().to_string(),
        "--service-latency-ms".to_string(),
        SERVICE_LATENCY_MS.to_string(),
    ];
    let mut cluster = LocalCluster::new(exe, &opts.data_dir, NODES)
        .base_port(opts.base_port)
        .timing("production")
        .node_args(node_args);
    let mut line = Line::new();
    let result = tokio::select! {
        r = run(&mut cluster, &opts, &ledger, &mut line) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    line.clear();
    let result = match result {
        None => {
            eprintln!("interrupted: stopping the nodes…");
            Err(anyhow!("interrupted"))
        }
        Some(Err(e)) => Err(anyhow!("{e:#}\n{}", log_tails(&cluster, 15))),
        Some(Ok(())) => Ok(()),
    };
    cluster.stop_all().await;
    result
}

/// Removes `dir` if it holds only what a demo leaves (`node-*`, `ledger.jsonl`); creates it.
fn wipe(dir: &Path) -> Result<()> {
    if dir.exists() {
        let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("node-") || name == "ledger.jsonl") {
                bail!(
                    "{} holds {name:?}, so it is not a demo's data directory; the demo wipes its \
                     directory first: pass another --data-dir",
                    dir.display()
                );
            }
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Submits order `o-<i>` for every `i` the counter hands out and waits for it to finish.
async fn worker(client: Client, next: Arc<AtomicU32>, orders: u32, progress: Arc<Progress>) -> Result<()> {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i > orders {
            return Ok(());
        }
        let instance = format!("o-{i}");
        let input = serde_json::to_string(&super::order_input(i))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        retry(&format!("order/{instance}"), deadline, &progress.retries, || {
            client.start_flow("order", &instance, &input, false, None)
        })
        .await?;
        progress.submitted.fetch_add(1, Ordering::Relaxed);
        // Starting again is idempotent: this waits for the result.
        let flow = run_order(&client, &instance, &input, &progress.retries).await?;
        if flow.status != "succeeded" {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut failures) = progress.failures.lock() {
                failures.push(flow);
            }
        }
        progress.finished.fetch_add(1, Ordering::Relaxed);
    }
}

fn leaders_text(per: &BTreeMap<u64, usize>) -> String {
    per.iter().map(|(id, n)| format!("node {id}: {n}")).collect::<Vec<_>>().join(", ")
}

async fn run(cluster: &mut LocalCluster, opts: &DemoOptions, ledger: &Path, line: &mut Line) -> Result<()> {
    let orders = u64::from(opts.orders);
    cluster.start_all().await.map_err(|e| anyhow!(e))?;
    line.event(&format!(
        "shop demo: starting {NODES} nodes on {} (data, logs and ledger in {})",
        cluster.addrs().join(", "),
        cluster.data_dir().display()
    ));
    cluster.wait_ready(READY).await.map_err(|e| anyhow!(e))?;
    let client = cluster.client().map_err(|e| anyhow!(e))?;
    // Status polls must not hang on the dead node while the progress line waits.
    let status_client = client.clone().with_timeout(Duration::from_secs(2));
    let status = client.cluster_status().await?;
    let shard_count = u32::try_from(status.shards.len())?;
    line.event(&format!(
        "cluster ready: {shard_count} shards, leaders {}; submitting {orders} orders, {} at a time",
        leaders_text(&status.leaders_per_node()),
        opts.concurrency
    ));

    let progress = Arc::new(Progress::default());
    let next = Arc::new(AtomicU32::new(1));
    let t0 = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency {
        workers.spawn(worker(client.clone(), next.clone(), opts.orders, progress.clone()));
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut kill: Option<Kill> = None;
    let mut all_done: Option<Duration> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(done) = workers.join_next() => done??,
        }
        let finished = progress.finished.load(Ordering::Relaxed);
        if all_done.is_none() && finished >= orders {
            all_done = Some(t0.elapsed());
        }
        match &mut kill {
            None if finished * 2 >= orders && NODES > 1 => {
                // A status that does not come (a busy node, a leader change) is asked again on
                // the next tick.
                let busiest = status_client.cluster_status().await.ok().map(|s| busiest_leader(&s));
                if let Some(Ok((victim, shards))) = busiest {
                    let at_ms = now_ms();
                    let at = Instant::now();
                    cluster.kill(victim).await.map_err(|e| anyhow!(e))?;
                    line.event(&format!(
                        "kill -9 node {victim} (leader of shards {shards:?}) with {finished} of {orders} orders finished"
                    ));
                    kill = Some(Kill { victim, shards, at_ms, at, elected_after: None, restarted: false });
                }
            }
            Some(k) => {
                if k.elected_after.is_none() {
                    if let Ok(status) = status_client.cluster_status().await {
                        if shards_moved(&status, k.victim, &k.shards) {
                            k.elected_after = Some(k.at.elapsed());
                            line.event(&format!(
                                "new leaders for shards {:?} after {} ms",
                                k.shards,
                                k.at.elapsed().as_millis()
                            ));
                        }
                    }
                }
                if !k.restarted && k.at.elapsed() >= opts.restart_after {
                    cluster.start(k.victim).await.map_err(|e| anyhow!(e))?;
                    k.restarted = true;
                    line.event(&format!(
                        "restarted node {} ({:.1} s after the kill)",
                        k.victim,
                        k.at.elapsed().as_secs_f64()
                    ));
                }
            }
            None => {}
        }
        line.draw(&progress, orders, t0);
        if finished >= orders && kill.as_ref().is_none_or(|k| k.restarted) {
            break;
        }
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    line.clear();
    let elapsed = all_done.unwrap_or_else(|| t0.elapsed());
    if let Some(k) = &kill {
        cluster.wait_ready(READY).await.map_err(|e| anyhow!("after restarting node {}: {e}", k.victim))?;
        // The reconciler hands the restarted node its share of leaders back.
        let deadline = Instant::now() + Duration::from_secs(30);
        let uneven = |per: &BTreeMap<u64, usize>| {
            let (min, max) = (per.values().min().copied(), per.values().max().copied());
            per.len() < NODES as usize || max.unwrap_or(0) - min.unwrap_or(0) > 1
        };
        let mut per = client.cluster_status().await?.leaders_per_node();
        while Instant::now() < deadline && uneven(&per) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            per = client.cluster_status().await?.leaders_per_node();
        }
        eprintln!(
            "node {} is back after {:.1} s; leaders {}",
            k.victim,
            k.at.elapsed().as_secs_f64(),
            leaders_text(&per)
        );
    }
    let entries = Ledger::read_all(ledger).context("reading the ledger")?;
    summary(opts, cluster, &progress, kill.as_ref(), &entries, shard_count, elapsed)
}

/// The effect an `effect_outcome_unknown` failure is about: the one still `started`, else the
/// error message's prefix.
fn failed_effect(flow: &proto::Flow) -> String {
    flow.effects
        .iter()
        .find(|e| e.state == "started")
        .map(|e| e.id.clone())
        .or_else(|| {
            flow.error.as_deref().and_then(|m| m.split_once(':')).map(|(id, _)| id.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn summary(
    opts: &DemoOptions,
    cluster: &LocalCluster,
    progress: &Progress,
    kill: Option<&Kill>,
    entries: &[LedgerEntry],
    shard_count: u32,
    elapsed: Duration,
) -> Result<()> {
    let orders = u64::from(opts.orders);
    let failures = progress.failures.lock().map(|f| f.clone()).unwrap_or_default();
    let addr = cluster.addr(1);
    let mut ships: BTreeMap<&str, u64> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.service == "logistics" && e.op == "ship") {
        *ships.entry(e.flow.as_str()).or_default() += 1;
    }
    let shipped = |instance: &str| ships.get(format!("order/{instance}").as_str()).copied().unwrap_or(0);

    println!();
    println!("=== shop demo: {orders} orders on {NODES} nodes ===");
    println!("succeeded: {}", orders - failures.len() as u64);
    println!("failed:    {}", failures.len());
    let mut groups: BTreeMap<(String, String), Vec<&proto::Flow>> = BTreeMap::new();
    for flow in &failures {
        let kind = flow.error_kind.clone().unwrap_or_else(|| flow.status.clone());
        let detail = if kind == "effect_outcome_unknown" {
            failed_effect(flow)
        } else {
            flow.error.clone().unwrap_or_default()
        };
        groups.entry((kind, detail)).or_default().push(flow);
    }
    for ((kind, detail), flows) in &groups {
        let names: Vec<&str> = flows.iter().take(8).map(|f| f.instance.as_str()).collect();
        let more = if flows.len() > names.len() { ", …" } else { "" };
        if kind == "effect_outcome_unknown" {
            let what = if detail == "ship" { " (shipping outcome unknown)" } else { "" };
            println!("  {} × {kind} on `{detail}`{what}: {}{more}", flows.len(), names.join(", "));
        } else {
            println!("  {} × {kind}: {detail}: {}{more}", flows.len(), names.join(", "));
        }
    }
    if let Some(flow) = failures.iter().find(|f| f.error_kind.as_deref() == Some("effect_outcome_unknown")) {
        let (o, effect) = (&flow.instance, failed_effect(flow));
        println!();
        println!("repairing {o}: the node running it died while `{effect}` was under way, so fetter");
        println!("cannot know whether it happened and does not guess (it is at most once). Restart the");
        println!(
            "demo's cluster on its data (`shop dev --data-dir {} --base-port {} -- --ledger {}`)",
            opts.data_dir.display(),
            opts.base_port,
            opts.data_dir.join("ledger.jsonl").display()
        );
        println!("and, in another terminal (shop = target/release/shop):");
        println!("  shop --addr {addr} flow get order {o}");
        if effect == "ship" && shipped(o) > 0 {
            println!("  # the ledger (logistics) shows {o} was shipped: record logistics' answer and resume");
            println!("  shop --addr {addr} flow effect-set order {o} ship '{{\"tracking_id\":\"tt-{o}\"}}'");
        } else {
            println!(
                "  # the ledger ({}) shows `{effect}` never happened: forget it, so it runs again",
                if effect == "ship" { "logistics" } else { "services" }
            );
            println!("  shop --addr {addr} flow effect-remove order {o} {effect}");
        }
        println!("  shop --addr {addr} flow restart order {o}");
    }

    println!();
    let mut histogram = [0u64; 3];
    let mut not_shipped_ok = Vec::new();
    let mut twice = Vec::new();
    for i in 1..=opts.orders {
        let o = format!("o-{i}");
        let n = shipped(&o);
        histogram[n.min(2) as usize] += 1;
        if n > 1 {
            twice.push(format!("{o} ({n}×)"));
        }
        if n == 0 && !failures.iter().any(|f| f.instance == o) {
            not_shipped_ok.push(o);
        }
    }
    println!(
        "shipments per order (ledger): shipped once {}, never {}, twice or more {}",
        histogram[1], histogram[0], histogram[2]
    );
    if !twice.is_empty() {
        println!();
        println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        println!("!!! WARNING: {} orders were SHIPPED MORE THAN ONCE: {}", twice.len(), twice.join(", "));
        println!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        println!();
    }
    if !not_shipped_ok.is_empty() {
        println!(
            "WARNING: {} orders succeeded without a shipment: {:?}",
            not_shipped_ok.len(),
            not_shipped_ok
        );
    }

    match kill {
        Some(k) => {
            let failover = failover_ms(entries, k.at_ms, k.victim, &k.shards, shard_count);
            let elected =
                k.elected_after.map_or_else(|| "not seen".to_string(), |d| format!("{} ms", d.as_millis()));
            match failover {
                Some(ms) => println!(
                    "failover: {ms} ms from kill -9 of node {} to the next service call of an order on its shards {:?} (new leaders seen after {elected})",
                    k.victim, k.shards
                ),
                None => println!(
                    "failover: no order on node {}'s shards {:?} made a service call after the kill (new leaders seen after {elected})",
                    k.victim, k.shards
                ),
            }
        }
        None => println!("failover: no node was killed"),
    }
    let retried = progress.retries.count();
    if retried > 0 {
        println!("client calls retried (failed over to another node): {retried}");
        for (message, n) in progress.retries.top(3) {
            println!("  {n} × {message}");
        }
    }
    println!(
        "throughput: {orders} orders in {:.1} s = {:.0} flows/s (services take {SERVICE_LATENCY_MS} ms, {} in flight, node {} killed half-way)",
        elapsed.as_secs_f64(),
        orders as f64 / elapsed.as_secs_f64(),
        opts.concurrency,
        kill.map_or_else(|| "-".to_string(), |k| k.victim.to_string())
    );
    println!("node logs: {}/node-<i>.log", cluster.data_dir().display());
    if !twice.is_empty() {
        bail!("{} orders shipped more than once", twice.len());
    }
    Ok(())
}
