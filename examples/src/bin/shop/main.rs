//! `shop`: a fetter node with the example flows.
//!
//! `shop bench --flows 10000 --concurrency 256` measures the runtime (see `bench.rs`).
//!
//! `shop run-batch --orders <N> --data-dir <dir> [--ledger <file>]` runs one node in-process,
//! idempotently starts orders `o-1..o-N` and exits 0 once every one has finished, printing how
//! many succeeded and failed. Killed and started again on the same directory, it resumes: the
//! orders already started are not started again, and every flow continues from its journal.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fetter::prelude::*;
use fetter::{Engine, EngineConfig};
use fetter_examples::fakes::{Email, Logistics, Payments};
use fetter_examples::flows::order::{Order, OrderFlow};
use fetter_examples::ledger::Ledger;

#[derive(Parser)]
#[command(name = "shop", about = "A fetter node with the example flows")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// RSS, and live activations with many suspended flows.
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
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shop: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shop: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::RunBatch { orders, data_dir, ledger, service_latency_ms, shards, concurrency } => {
            let latency = Duration::from_millis(service_latency_ms);
            run_batch(orders, data_dir, ledger, latency, shards, concurrency.max(1)).await
        }
        Command::Bench { flows, concurrency, suspended } => {
            bench::bench(flows, concurrency.max(1), suspended).await
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
    let ledger = match ledger {
        Some(path) => Some(Ledger::open(&path).with_context(|| format!("ledger {}", path.display()))?),
        None => None,
    };
    const NODE: u64 = 1;
    let flow = OrderFlow::new(
        Payments::new(ledger.clone(), NODE),
        Logistics::new(ledger.clone(), NODE),
        Email::new(ledger, NODE),
        latency,
    );
    let registry = Registry::new().register(flow)?;
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
