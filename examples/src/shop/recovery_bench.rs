//! `shop bench-recovery --flows 1000000`: how long a node takes to serve again after `kill -9`
//! with many finished flows and a long log.
//!
//! One `shop node` process of this program (production Raft timing, instant fake services, a
//! fresh temp directory, a free port, 12 shards unless `--shards`), and through the public gRPC
//! API from this process:
//!
//! 1. `--flows` RPC orders run to the end (`StartFlow{wait}`, `--concurrency` in flight), each
//!    input padded to `--input-bytes` with product ids;
//! 2. the sizes of the node's write-ahead log (`wal/`) and state (`state/`) are read;
//! 3. the node is `kill -9`ed and started again on the same directory, at once; measured from
//!    the restart: the node answering as ready, a linearizable read of the last order answering
//!    `succeeded`, and a new order running to its end.
//!
//! `--snapshot-after-entries` is passed to the node: raised, the log is not purged and grows to
//! every entry since the start (the worst case for a restart: everything since the last
//! checkpoint is applied again); at the default, snapshots keep it short.
//!
//! The last line is one JSON object.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fetter::local::LocalCluster;
use fetter::Client;
use serde_json::json;

use super::cluster_bench::{free_ports, retry, run_order, stop_with, unless_interrupted, Retries};

/// The node's id (the cluster has only this one).
const NODE: u64 = 1;
/// Bound on the node becoming ready, at the start and after the restart.
const READY: Duration = Duration::from_secs(600);
/// Bound on the first read and the first order after the restart.
const SERVE: Duration = Duration::from_secs(600);
/// How often progress is printed while the orders run.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// `shop bench-recovery` options.
#[derive(Debug, Clone)]
pub(super) struct RecoveryBenchOptions {
    /// Orders to run before the kill.
    pub(super) flows: u64,
    /// Orders in flight.
    pub(super) concurrency: usize,
    /// Bytes of each order's input (padded with product ids).
    pub(super) input_bytes: usize,
    /// Shards of the node.
    pub(super) shards: u32,
    /// The node's snapshot policy (`None`: its default).
    pub(super) snapshot_after_entries: Option<u64>,
}

/// Runs the benchmark on a node process of its own, stopped at the end, on an error and on Ctrl-C.
pub(super) async fn bench(opts: RecoveryBenchOptions) -> Result<()> {
    if opts.flows == 0 {
        bail!("--flows must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let dir = tempfile::Builder::new().prefix("shop-bench-recovery-").tempdir_in(std::env::temp_dir())?;
    let mut node_args = Vec::new();
    if let Some(n) = opts.snapshot_after_entries {
        node_args.extend(["--snapshot-after-entries".to_string(), n.to_string()]);
    }
    let mut cluster = LocalCluster::new(exe, dir.path().join("cluster"), 1)
        .base_port(free_ports(1)?)
        .shards(opts.shards)
        .timing("production")
        .node_args(node_args);
    let outcome = unless_interrupted(run(&mut cluster, &opts)).await;
    stop_with(&mut cluster, outcome, 30).await
}

/// An order input of about `bytes` bytes.
fn input(instance: &str, i: u64, bytes: usize) -> String {
    let mut products = vec!["p-1".to_string()];
    let mut len = 100 + instance.len();
    let mut k = 2;
    while len < bytes {
        let p = format!("p-{k:06}");
        len += p.len() + 3;
        products.push(p);
        k += 1;
    }
    json!({
        "order_id": instance,
        "customer_id": format!("c-{}", i % 97),
        "total_cents": 100 + i,
        "products": products,
    })
    .to_string()
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

/// Runs `opts.flows` orders, `opts.concurrency` in flight; how many calls were retried.
async fn run_orders(client: &Client, opts: &RecoveryBenchOptions) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(Retries::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency {
        let (client, next, done, retries, opts) =
            (client.clone(), next.clone(), done.clone(), retries.clone(), opts.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.flows {
                    return Ok::<_, anyhow::Error>(());
                }
                let instance = format!("r-{i}");
                let flow =
                    run_order(&client, &instance, &input(&instance, i, opts.input_bytes), &retries).await?;
                if flow.status != "succeeded" {
                    bail!("order/{instance} ended {}", flow.status);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(r) => r??,
                None => break,
            },
            _ = tick.tick() => {
                let n = done.load(Ordering::Relaxed);
                println!("  {n} orders done in {:.0} s ({:.0}/s)", t0.elapsed().as_secs_f64(), n as f64 / t0.elapsed().as_secs_f64());
            }
        }
    }
    Ok(retries.count())
}

async fn run(cluster: &mut LocalCluster, opts: &RecoveryBenchOptions) -> Result<()> {
    println!(
        "shop bench-recovery: 1 node, {} shards; {} orders of ~{} input bytes, {} in flight; snapshot after {}",
        opts.shards,
        opts.flows,
        opts.input_bytes,
        opts.concurrency,
        opts.snapshot_after_entries.map_or("the default".to_string(), |n| format!("{n} entries"))
    );
    cluster.start_all().await.map_err(|e| anyhow!(e))?;
    cluster.wait_ready(READY).await.map_err(|e| anyhow!(e))?;
    let client = Client::connect(cluster.addrs()).map_err(|e| anyhow!("{e}"))?;

    let t0 = Instant::now();
    let retries = run_orders(&client, opts).await?;
    let load_s = t0.elapsed().as_secs_f64();
    println!("  {} orders in {load_s:.0} s ({retries} calls retried)", opts.flows);

    let node_dir = cluster.node_dir(NODE);
    let (wal, state) = (dir_bytes(&node_dir.join("wal")), dir_bytes(&node_dir.join("state")));
    println!("  on disk: write-ahead log {} MiB, state {} MiB", mib(wal), mib(state));

    cluster.kill(NODE).await.map_err(|e| anyhow!(e))?;
    let restart = Instant::now();
    cluster.start(NODE).await.map_err(|e| anyhow!(e))?;
    cluster.wait_ready(READY).await.map_err(|e| anyhow!(e))?;
    let ready_ms = restart.elapsed().as_millis() as u64;
    println!("  ready {ready_ms} ms after the restart");
    let client = Client::connect(cluster.addrs()).map_err(|e| anyhow!("{e}"))?;
    let retries = Retries::default();
    let last = format!("r-{}", opts.flows - 1);
    let until = restart + SERVE;
    let flow =
        retry(&format!("get order/{last}"), until, &retries, || client.get_flow("order", &last)).await?;
    let read_ms = restart.elapsed().as_millis() as u64;
    if flow.status != "succeeded" {
        bail!("order/{last} is {} after the restart", flow.status);
    }
    println!("  order/{last} read back ({}) {read_ms} ms after the restart", flow.status);
    let fresh = "r-after-restart";
    let flow = run_order(&client, fresh, &input(fresh, 0, opts.input_bytes), &retries).await?;
    let order_ms = restart.elapsed().as_millis() as u64;
    if flow.status != "succeeded" {
        bail!("order/{fresh} ended {}", flow.status);
    }
    println!("  a new order ran to its end {order_ms} ms after the restart");
    let line = json!({
        "flows": opts.flows,
        "shards": opts.shards,
        "input_bytes": opts.input_bytes,
        "snapshot_after_entries": opts.snapshot_after_entries,
        "load_s": (load_s * 10.0).round() / 10.0,
        "wal_mib": mib(wal),
        "state_mib": mib(state),
        "restart_to_ready_ms": ready_ms,
        "restart_to_read_ms": read_ms,
        "restart_to_new_order_ms": order_ms,
        "retries_after_restart": retries.count(),
    });
    println!("{line}");
    Ok(())
}
