//! `shop bench`: the flow runtime's throughput and latency on one embedded node.
//!
//! Runs `--flows` RPC orders (instant fakes: 4 effects + the captured transaction id = 5 steps)
//! at `--concurrency`, then 200 orders one at a time, then (unless `--suspended 0`) starts
//! `--suspended` flows that wait for a message for up to 24 hours (`message_within`: each has a
//! durable timer), with sled's cache at 64 MiB, and reports live activations, timers held in
//! memory and RSS once all are suspended. The last line is one JSON object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fakes::{Email, Logistics, Payments};
use crate::flows::order::OrderFlow;
use anyhow::{anyhow, bail, Context, Result};
use fetter::prelude::*;
use fetter::{Engine, EngineConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Steps of one order: the transaction id and four effects.
const STEPS_PER_ORDER: u64 = 5;
const WAIT: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
struct Wake {}

impl Message for Wake {
    const NAME: &'static str = "Wake";
}

/// A flow that waits for one message, for a day at most.
struct Sleeper;

impl Flow for Sleeper {
    const TYPE: &'static str = "sleeper";
    type Input = ();
    type Output = ();

    async fn run(&self, ctx: &Ctx, _: ()) -> Result<(), FlowError> {
        let _: Option<Wake> = ctx.message_within("wake", Duration::from_secs(24 * 3600)).await?;
        Ok(())
    }
}

fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn order_input(i: u64) -> Vec<u8> {
    format!(
        r#"{{"order_id":"b-{i}","customer_id":"c-{}","total_cents":{},"products":["p-1"]}}"#,
        i % 97,
        100 + i
    )
    .into_bytes()
}

/// Completion notifications, dispatched to whoever waits for a flow.
type Waiters = Arc<Mutex<HashMap<FlowId, oneshot::Sender<FlowStatus>>>>;

fn dispatch(engine: &Engine) -> Waiters {
    let waiters: Waiters = Arc::default();
    let mut finished = engine.finished();
    let w = waiters.clone();
    tokio::spawn(async move {
        while let Ok((flow, status)) = finished.recv().await {
            let waiter = w.lock().ok().and_then(|mut m| m.remove(&flow));
            if let Some(tx) = waiter {
                let _ = tx.send(status);
            }
        }
    });
    waiters
}

/// Runs orders `first..first+count` at `concurrency`; returns each flow's latency.
async fn run_orders(
    engine: &Engine,
    waiters: &Waiters,
    first: u64,
    count: u64,
    concurrency: usize,
) -> Result<Vec<Duration>> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(first));
    let end = first + count;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (panel, waiters, next) = (engine.panel().clone(), waiters.clone(), next.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let flow = FlowId::new("order", format!("b-{i}"));
                let (tx, rx) = oneshot::channel();
                waiters.lock().map_err(|_| anyhow!("poisoned"))?.insert(flow.clone(), tx);
                let t0 = Instant::now();
                panel.start(&flow, order_input(i)).await?;
                let status = tokio::time::timeout(WAIT, rx).await.context("order timed out")??;
                if status != FlowStatus::Succeeded {
                    bail!("{flow} ended {status:?}");
                }
                latencies.push(t0.elapsed());
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok(all)
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

pub(crate) async fn bench(flows: u64, concurrency: usize, suspended: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let order =
        OrderFlow::new(Payments::new(None, 1), Logistics::new(None, 1), Email::new(None, 1), Duration::ZERO);
    let registry = Registry::new().register(order)?.register(Sleeper)?;
    let mut config = EngineConfig::new(dir.path().join("data"));
    config.cache_bytes = 64 * 1024 * 1024;
    let engine = Engine::start(config, registry).await?;
    let waiters = dispatch(&engine);
    let idle_rss = rss_mib("VmRSS:");
    println!("shop bench: 1 embedded node, 12 shards; {flows} RPC orders at concurrency {concurrency}");

    let t0 = Instant::now();
    let mut latencies = run_orders(&engine, &waiters, 0, flows, concurrency).await?;
    let elapsed = t0.elapsed().as_secs_f64();
    latencies.sort();
    let flows_per_s = flows as f64 / elapsed;
    let effects_per_s = flows_per_s * STEPS_PER_ORDER as f64;
    let (p50, p99) = (percentile_ms(&latencies, 0.50), percentile_ms(&latencies, 0.99));
    println!(
        "  {flows_per_s:.0} flows/s, {effects_per_s:.0} effects/s; latency p50 {p50:.2} ms, p99 {p99:.2} ms"
    );

    let mut c1 = run_orders(&engine, &waiters, flows, 200, 1).await?;
    c1.sort();
    let c1_p50 = percentile_ms(&c1, 0.50);
    println!("  concurrency 1: p50 {c1_p50:.2} ms");
    let peak_rss = rss_mib("VmHWM:");

    let (mut suspended_rss, mut live, mut timers) = (0.0, 0usize, 0usize);
    if suspended > 0 {
        let panel = engine.panel().clone();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..concurrency {
            let (panel, next) = (panel.clone(), next.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= suspended {
                        return Ok::<_, anyhow::Error>(());
                    }
                    panel.start(&FlowId::new("sleeper", format!("s-{i}")), b"null".to_vec()).await?;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        // Every flow activates, finds no message and suspends; then no activation is left.
        let deadline = Instant::now() + WAIT;
        loop {
            let query = ListQuery {
                flow_type: Some("sleeper".into()),
                status: Some(vec![FlowStatus::Running]),
                limit: 1,
                ..ListQuery::default()
            };
            if panel.list(&query).await?.is_empty() && engine.live_flows() == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("suspended flows did not settle within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        suspended_rss = rss_mib("VmRSS:");
        live = engine.live_flows();
        timers = engine.timers_in_memory();
        println!(
            "  {suspended} suspended flows (started in {:.1} s): {live} live activations, {timers} timers in memory, RSS {suspended_rss:.0} MiB (idle {idle_rss:.0} MiB)",
            started.elapsed().as_secs_f64()
        );
    }
    println!("  peak RSS {peak_rss:.0} MiB");
    println!(
        "{{\"flows\":{flows},\"concurrency\":{concurrency},\"flows_per_s\":{flows_per_s:.1},\"effects_per_s\":{effects_per_s:.1},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"c1_p50_ms\":{c1_p50:.3},\"peak_rss_mib\":{peak_rss:.1},\"idle_rss_mib\":{idle_rss:.1},\"suspended_100k_rss_mib\":{suspended_rss:.1},\"suspended_100k_live_actors\":{live},\"timers_in_memory\":{timers}}}"
    );
    engine.shutdown().await;
    Ok(())
}
