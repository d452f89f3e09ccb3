//! `shop`: a fetter application with the example flows — a cluster node, the whole fetter CLI,
//! and its own commands.
//!
//! - `shop node --id 1 --listen 127.0.0.1:7001 --data-dir ./data/node-1 --peers 1=…,2=…,3=…
//!   [--ledger <file>]` runs one node of a cluster; `shop dev --nodes 3` a local cluster;
//!   `shop flow …` / `shop cluster …` talk to it (see `fetter::app`).
//! - `shop run-batch --orders <N> --data-dir <dir> [--ledger <file>]` runs one node in-process,
//!   idempotently starts orders `o-1..o-N` and exits 0 once every one has finished, printing how
//!   many succeeded and failed. Killed and started again on the same directory, it resumes.
//! - `shop bench --flows 10000 --concurrency 256` measures the runtime (see `bench.rs`).
//! - `shop bench-timers --flows 25000 --interval-ms 60000` checks and measures durable timers
//!   across a `kill -9` and restart of a one-shard node (see `timer_bench.rs`).

mod bench;
mod cluster_bench;
mod demo;
mod recovery_bench;
mod timer_bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::flows::order::Order;
use crate::ledger::Ledger;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fetter::prelude::*;
use fetter::{App, Engine, EngineConfig};

/// `shop node` options.
#[derive(Args, Debug, Clone)]
struct ShopNode {
    /// Append every call of the fake services to this JSON-lines ledger (shared by nodes).
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Simulated latency of the payment and email calls of `order`, in milliseconds.
    #[arg(long, default_value_t = 0)]
    service_latency_ms: u64,
    /// Simulated latency of logistics' answer to a shipment of `order` (the call is received at
    /// once, answered this much later), in milliseconds.
    #[arg(long, default_value_t = 0)]
    ship_latency_ms: u64,
}

#[derive(Subcommand, Debug)]
enum ShopCommand {
    /// Start orders o-1..o-N on a single in-process node and wait until all have finished.
    RunBatch {
        /// How many orders.
        #[arg(long)]
        orders: u32,
        /// The node's data directory (reused on restart).
        #[arg(long)]
        data_dir: PathBuf,
        /// Append every call of the fake services to this JSON-lines ledger.
        #[arg(long)]
        ledger: Option<PathBuf>,
        /// Simulated latency of the payment and email calls, in milliseconds.
        #[arg(long, default_value_t = 0)]
        service_latency_ms: u64,
        /// Shards (fixed when the data directory is first used).
        #[arg(long, default_value_t = 12)]
        shards: u32,
        /// Orders in flight at most (started and not finished).
        #[arg(long, default_value_t = 50)]
        concurrency: u32,
    },
    /// Measure the runtime on one embedded node (release build): flows/s, effects/s, latency,
    /// RSS, and live activations with many suspended flows. With `--nodes` or `--addr`: a
    /// cluster of node processes, through the gRPC API (and failover with `--kill`).
    Bench {
        /// RPC orders to run.
        #[arg(long, default_value_t = 10_000)]
        flows: u64,
        /// Orders in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Waiting flows to start afterwards (0 skips that part).
        #[arg(long, default_value_t = 100_000)]
        suspended: u64,
        /// Benchmark a local cluster of this many node processes instead (started and stopped here).
        #[arg(long)]
        nodes: Option<u64>,
        /// Benchmark the running cluster at this address instead (host:port, several separated by
        /// commas). Shares its id with the global `--addr`.
        #[arg(long, id = "addr", value_name = "HOST:PORT", conflicts_with = "nodes")]
        addr: Option<String>,
        /// With --nodes: this many rounds of `kill -9` of the busiest leader while orders run.
        #[arg(long, default_value_t = 0)]
        kill: u32,
    },
    /// Durable timers across a crash: one node process with one shard, `--flows` signups waiting
    /// on a reminder, `kill -9` and restart; every first reminder must be sent, once. Reports how
    /// late they were and the node's RSS.
    BenchTimers {
        /// Signups to start.
        #[arg(long, default_value_t = 25_000)]
        flows: u64,
        /// Their reminder interval, in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        interval_ms: u64,
        /// Client calls in flight.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
    },
    /// Recovery: one node process runs `--flows` orders to the end, is `kill -9`ed and started
    /// again; reports the sizes of its log and state and how long until it serves again.
    BenchRecovery {
        /// Orders to run before the kill.
        #[arg(long, default_value_t = 1_000_000)]
        flows: u64,
        /// Orders in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Bytes of each order's input (padded with product ids).
        #[arg(long, default_value_t = 200)]
        input_bytes: usize,
        /// Shards.
        #[arg(long, default_value_t = 12)]
        shards: u32,
        /// The node's snapshot policy (raise it to keep every entry in the log).
        #[arg(long)]
        snapshot_after_entries: Option<u64>,
    },
    /// The demo: a local 3-node cluster runs orders while its busiest leader is killed and
    /// restarted; prints what happened to every order (and to the shipments).
    Demo {
        /// How many orders.
        #[arg(long, default_value_t = 1_000)]
        orders: u32,
        /// The first node's port (node i listens on port + i - 1).
        #[arg(long, default_value_t = 7001)]
        base_port: u16,
        /// Where the nodes keep data and logs, and the ledger (wiped first).
        #[arg(long, default_value = "./data/demo")]
        data_dir: PathBuf,
        /// Orders in flight at most.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// How long the killed node stays down, in seconds.
        #[arg(long, default_value_t = 5)]
        restart_after_secs: u64,
    },
}

fn open_ledger(path: Option<&PathBuf>) -> Result<Option<Ledger>> {
    match path {
        Some(path) => Ok(Some(Ledger::open(path).with_context(|| format!("ledger {}", path.display()))?)),
        None => Ok(None),
    }
}

/// The `shop` program: parses the command line and runs it.
pub fn main() -> ExitCode {
    let app = App::with_options("shop", |opts: &ShopNode, node| {
        let ledger = open_ledger(opts.ledger.as_ref()).map_err(|e| format!("{e:#}"))?;
        let latency = Duration::from_millis(opts.service_latency_ms);
        let ship_latency = Duration::from_millis(opts.ship_latency_ms);
        Ok(crate::registry_with(ledger, node.0, latency, ship_latency)?)
    });
    app.run_with(|command: ShopCommand| async move {
        fetter::app::init_tracing("warn,openraft=error");
        match run(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}

async fn run(command: ShopCommand) -> Result<()> {
    match command {
        ShopCommand::RunBatch { orders, data_dir, ledger, service_latency_ms, shards, concurrency } => {
            let latency = Duration::from_millis(service_latency_ms);
            run_batch(orders, data_dir, ledger, latency, shards, concurrency.max(1)).await
        }
        ShopCommand::Bench { flows, concurrency, suspended, nodes, addr, kill } => {
            // The global `--addr` always has a value: only an explicit one selects a cluster.
            let addr_given = std::env::var_os("FETTER_ADDR").is_some()
                || std::env::args().any(|a| a == "--addr" || a.starts_with("--addr="));
            if nodes.is_some() || addr_given {
                let addr = if nodes.is_some() { None } else { addr };
                let opts = cluster_bench::ClusterBenchOptions {
                    nodes,
                    addr,
                    flows,
                    concurrency: concurrency.max(1),
                    kill,
                };
                cluster_bench::bench(opts).await
            } else {
                bench::bench(flows, concurrency.max(1), suspended).await
            }
        }
        ShopCommand::BenchTimers { flows, interval_ms, concurrency } => {
            let opts = timer_bench::TimerBenchOptions { flows, interval_ms, concurrency: concurrency.max(1) };
            timer_bench::bench(opts).await
        }
        ShopCommand::BenchRecovery { flows, concurrency, input_bytes, shards, snapshot_after_entries } => {
            let opts = recovery_bench::RecoveryBenchOptions {
                flows,
                concurrency: concurrency.max(1),
                input_bytes,
                shards: shards.max(1),
                snapshot_after_entries,
            };
            recovery_bench::bench(opts).await
        }
        ShopCommand::Demo { orders, base_port, data_dir, concurrency, restart_after_secs } => {
            let opts = demo::DemoOptions {
                orders,
                base_port,
                data_dir,
                concurrency: concurrency.max(1),
                restart_after: Duration::from_secs(restart_after_secs),
            };
            demo::demo(opts).await
        }
    }
}

/// (succeeded, failed or cancelled) orders.
async fn count_finished(panel: &ControlPanel) -> Result<(u32, u32)> {
    let (mut succeeded, mut failed) = (0u32, 0u32);
    let mut query = ListQuery {
        flow_type: Some("order".into()),
        status: Some(vec![FlowStatus::Succeeded, FlowStatus::Failed, FlowStatus::Cancelled]),
        after: None,
        limit: 500,
    };
    loop {
        let page = panel.list(&query).await?;
        let Some(last) = page.last() else { return Ok((succeeded, failed)) };
        query.after = Some(last.id.clone());
        for record in &page {
            if record.status == FlowStatus::Succeeded {
                succeeded += 1;
            } else {
                failed += 1;
            }
        }
    }
}

fn order_input(i: u32) -> Order {
    Order {
        order_id: format!("o-{i}"),
        customer_id: format!("c-{}", i % 17),
        total_cents: 1_000 + u64::from(i),
        products: vec!["p-1".into(), "p-2".into()],
    }
}

async fn run_batch(
    orders: u32,
    data_dir: PathBuf,
    ledger: Option<PathBuf>,
    latency: Duration,
    shards: u32,
    concurrency: u32,
) -> Result<()> {
    let ledger = open_ledger(ledger.as_ref())?;
    let registry = crate::registry(ledger, 1, latency)?;
    let mut config = EngineConfig::new(&data_dir);
    config.shards = shards;
    let engine = Engine::start(config, registry).await.context("cannot start the node")?;
    let panel = engine.panel();
    // Orders are started in order, keeping at most `concurrency` in flight. Starting is
    // idempotent, so after a restart the orders already started are simply found again.
    let mut next = 1u32;
    loop {
        let (succeeded, failed) = count_finished(panel).await?;
        let finished = succeeded + failed;
        while next <= orders && (next - 1).saturating_sub(finished) < concurrency {
            let input = serde_json::to_vec(&order_input(next))?;
            panel.start(&FlowId::new("order", format!("o-{next}")), input).await?;
            next += 1;
        }
        println!("progress: started={} finished={finished}", next - 1);
        if finished >= orders {
            println!("done: {orders} orders, {succeeded} succeeded, {failed} failed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine.shutdown().await;
    Ok(())
}
