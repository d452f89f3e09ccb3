//! `shop bench-timers --flows 25000 --interval-ms 60000`: durable timers across a `kill -9`.
//!
//! One `shop node` process of this program with one shard (production Raft timing, instant fake
//! services writing a ledger, a fresh temp directory, a free port) and, through the public gRPC
//! API from this process:
//!
//! 1. `--flows` signups `c-0..c-N` are started with `reminder_interval_ms = --interval-ms`,
//!    `--concurrency` calls in flight;
//! 2. once the ledger shows every activation mail, every signup is read back until it is
//!    `suspended` with its `verify-0` timer (whose deadline is kept for the lateness figures);
//! 3. the node is `kill -9`ed and started again on the same directory, at once;
//! 4. the ledger is watched until every signup has sent its first reminder (`reminder-1`), at
//!    most until the latest deadline plus [`SLACK`].
//!
//! A first reminder is late by its ledger time minus its timer's deadline. A second `reminder`
//! entry for a customer within one interval of the first is a duplicate: the legitimate second
//! reminder (`reminder-2`) can only be sent an interval after the first. The command fails when a
//! reminder is missing or sent twice, when an activation mail was sent twice, or when a reminder
//! went out before the kill (then the interval is too short for the flows to be started and read
//! back in time, and the restart would not be what is measured).
//!
//! The last line is one JSON object.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fetter::local::LocalCluster;
use fetter::Client;
use serde_json::json;

use super::cluster_bench::{free_ports, now_ms, retry, stop_with, unless_interrupted, LedgerTail, Retries};
use crate::fakes::Email;
use crate::ledger::LedgerEntry;

/// The node's id (the cluster has only this one).
const NODE: u64 = 1;
/// Bound on the node becoming ready, at the start and after the restart.
const READY: Duration = Duration::from_secs(120);
/// Bound on one client call, its retries included.
const CALL: Duration = Duration::from_secs(60);
/// Bound on the activation mails and the suspended state after the last signup was started.
const SETTLE: Duration = Duration::from_secs(300);
/// How long after the latest deadline the last reminder may come.
const SLACK: Duration = Duration::from_secs(120);
/// How often the ledger is read while waiting.
const POLL: Duration = Duration::from_millis(200);
/// How often progress is printed while waiting for the reminders.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `shop bench-timers` options.
#[derive(Debug, Clone)]
pub(super) struct TimerBenchOptions {
    /// Signups to start.
    pub(super) flows: u64,
    /// Their reminder interval.
    pub(super) interval_ms: u64,
    /// Client calls in flight.
    pub(super) concurrency: usize,
}

/// Runs the benchmark on a node process of its own, stopped at the end, on an error and on Ctrl-C.
pub(super) async fn bench(opts: TimerBenchOptions) -> Result<()> {
    if opts.flows == 0 || opts.interval_ms == 0 {
        bail!("--flows and --interval-ms must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let dir = tempfile::Builder::new().prefix("shop-bench-timers-").tempdir()?;
    let ledger = dir.path().join("ledger.jsonl");
    let mut cluster = LocalCluster::new(exe, dir.path().join("cluster"), 1)
        .base_port(free_ports(1)?)
        .shards(1)
        .timing("production")
        .node_args(vec!["--ledger".to_string(), ledger.display().to_string()]);
    let outcome = unless_interrupted(run(&mut cluster, &opts, &ledger)).await;
    stop_with(&mut cluster, outcome, 30).await
}

/// The customer id of signup `i`.
fn customer(i: u64) -> String {
    format!("c-{i}")
}

/// A figure of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`) in MiB, or `None` when unreadable.
fn rss_mib(pid: Option<u32>, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.trim_start_matches(field).trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024.0)
}

/// Seconds since `t0`, for progress lines.
fn secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// The value at quantile `p` of sorted values.
fn quantile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Mails of one template, by customer: the time of every `send`.
#[derive(Default)]
struct Mails {
    sent: HashMap<String, Vec<u64>>,
}

impl Mails {
    /// Adds the entries of `template` mails among `entries`.
    fn add(&mut self, entries: &[LedgerEntry], template: &str) {
        let prefix = format!("{template}:");
        for e in entries.iter().filter(|e| e.service == Email::SERVICE && e.op == Email::SEND) {
            if let Some(customer) = e.key.strip_prefix(&prefix) {
                self.sent.entry(customer.to_string()).or_default().push(e.ts_ms);
            }
        }
    }

    /// Customers mailed at least once.
    fn customers(&self) -> usize {
        self.sent.len()
    }

    /// The first mail of `customer`.
    fn first(&self, customer: &str) -> Option<u64> {
        self.sent.get(customer).and_then(|times| times.iter().min().copied())
    }

    /// Customers mailed again less than `within_ms` after their first mail.
    fn twice_within(&self, within_ms: u64) -> usize {
        self.sent
            .values()
            .filter(|times| {
                let first = times.iter().min().copied().unwrap_or(0);
                times.iter().filter(|t| **t < first.saturating_add(within_ms)).count() > 1
            })
            .count()
    }

    /// Mails beyond the first per customer.
    fn extra(&self) -> usize {
        self.sent.values().map(|times| times.len().saturating_sub(1)).sum()
    }
}

/// Starts every signup, `concurrency` calls in flight; how many client calls were retried.
async fn start_signups(client: &Client, opts: &TimerBenchOptions) -> Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(Retries::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency {
        let (client, next, retries, opts) = (client.clone(), next.clone(), retries.clone(), opts.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.flows {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = customer(i);
                let input = json!({
                    "customer_id": id,
                    "email": format!("{id}@example.com"),
                    "reminder_interval_ms": opts.interval_ms,
                })
                .to_string();
                let deadline = Instant::now() + CALL;
                retry(&format!("start signup/{id}"), deadline, &retries, || {
                    client.start_flow("signup", &id, &input, false, None)
                })
                .await?;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(retries.count())
}

/// Reads every signup back until it is suspended with its `verify-0` timer; the deadlines by
/// customer.
async fn read_deadlines(client: &Client, opts: &TimerBenchOptions) -> Result<HashMap<String, u64>> {
    let next = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(Retries::default());
    let deadlines = Arc::new(Mutex::new(HashMap::new()));
    let until = Instant::now() + SETTLE;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency {
        let (client, next, retries, deadlines) =
            (client.clone(), next.clone(), retries.clone(), deadlines.clone());
        let flows = opts.flows;
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= flows {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = customer(i);
                loop {
                    let flow = retry(&format!("get signup/{id}"), until, &retries, || {
                        client.get_flow("signup", &id)
                    })
                    .await?;
                    let timer = flow.timers.iter().find(|t| t.id == "verify-0");
                    match timer {
                        Some(timer) if flow.status == "suspended" => {
                            if let Ok(mut deadlines) = deadlines.lock() {
                                deadlines.insert(id.clone(), timer.deadline_ms);
                            }
                            break;
                        }
                        _ if Instant::now() >= until => bail!(
                            "signup/{id} is {} (timers {:?}) and not suspended on verify-0 within {SETTLE:?}",
                            flow.status,
                            flow.timers.iter().map(|t| &t.id).collect::<Vec<_>>()
                        ),
                        _ => tokio::time::sleep(POLL).await,
                    }
                }
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let deadlines = deadlines.lock().map(|d| d.clone()).map_err(|_| anyhow!("a reader panicked"))?;
    Ok(deadlines)
}

async fn run(cluster: &mut LocalCluster, opts: &TimerBenchOptions, ledger: &Path) -> Result<()> {
    let flows = opts.flows;
    let n = usize::try_from(flows).context("--flows is too large")?;
    let interval = opts.interval_ms;
    println!(
        "shop bench-timers: 1 node, 1 shard; {flows} signups with a {interval} ms reminder interval, {} calls in flight",
        opts.concurrency
    );
    cluster.start_all().await.map_err(|e| anyhow!(e))?;
    cluster.wait_ready(READY).await.map_err(|e| anyhow!(e))?;
    let client = Client::connect(cluster.addrs()).map_err(|e| anyhow!("{e}"))?;
    let mut tail = LedgerTail::new(ledger);
    let (mut activations, mut reminders) = (Mails::default(), Mails::default());

    // 1. Start the signups.
    let (t0, t0_ms) = (Instant::now(), now_ms());
    let start_retries = start_signups(&client, opts).await?;
    let started_s = secs(t0);
    println!(
        "  started {flows} signups in {started_s:.1} s ({:.0}/s, {start_retries} calls retried)",
        flows as f64 / started_s
    );

    // 2. Every activation mail sent, every signup suspended on its first timer.
    let settle_until = Instant::now() + SETTLE;
    loop {
        let entries = tail.read_new()?;
        activations.add(&entries, Email::ACTIVATION);
        reminders.add(&entries, Email::REMINDER);
        if activations.customers() >= n {
            break;
        }
        if Instant::now() >= settle_until {
            bail!("only {} of {flows} activation mails were sent within {SETTLE:?}", activations.customers());
        }
        tokio::time::sleep(POLL).await;
    }
    let deadlines = read_deadlines(&client, opts).await?;
    let (earliest, latest) =
        (deadlines.values().min().copied().unwrap_or(0), deadlines.values().max().copied().unwrap_or(0));
    let rss_suspended = rss_mib(cluster.pid(NODE), "VmRSS:");
    println!(
        "  {} activation mails sent, {} signups suspended on verify-0 after {:.1} s; node RSS {} MiB",
        activations.customers(),
        deadlines.len(),
        secs(t0),
        rss_suspended.map_or_else(|| "?".to_string(), |r| format!("{r:.0}"))
    );

    // 3. kill -9 and restart on the same directory.
    reminders.add(&tail.read_new()?, Email::REMINDER);
    let since_t0 = |ts: u64| (ts as f64 - t0_ms as f64) / 1000.0;
    let kill_ms = now_ms();
    cluster.kill(NODE).await.map_err(|e| anyhow!(e))?;
    reminders.add(&tail.read_new()?, Email::REMINDER);
    if reminders.customers() > 0 {
        bail!(
            "{} reminders were sent before the kill ({:.1} s after the first start; the earliest deadline was \
             {:.1} s after it): the interval is too short for {flows} signups here, use a longer --interval-ms",
            reminders.customers(),
            since_t0(kill_ms),
            since_t0(earliest)
        );
    }
    let restart_ms = now_ms();
    let restarted = Instant::now();
    cluster.start(NODE).await.map_err(|e| anyhow!(e))?;
    cluster.wait_ready(READY).await.map_err(|e| anyhow!("after the restart: {e}"))?;
    let ready_ms = u64::try_from(restarted.elapsed().as_millis()).unwrap_or(u64::MAX);
    let rel = |ts: u64| ts as i64 - restart_ms as i64;
    println!(
        "  kill -9 {:.1} s after the first start; restarted, ready after {ready_ms} ms; deadlines from {:+.1} s to {:+.1} s after the restart",
        since_t0(kill_ms),
        rel(earliest) as f64 / 1000.0,
        rel(latest) as f64 / 1000.0,
    );

    // 4. Every first reminder, bounded by the latest deadline plus the slack.
    let until_ms = latest.saturating_add(u64::try_from(SLACK.as_millis()).unwrap_or(u64::MAX));
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    let mut rss_max = 0.0f64;
    loop {
        reminders.add(&tail.read_new()?, Email::REMINDER);
        if let Some(rss) = rss_mib(cluster.pid(NODE), "VmRSS:") {
            rss_max = rss_max.max(rss);
        }
        let sent = reminders.customers();
        if sent >= n {
            break;
        }
        if Instant::now() >= next_progress {
            println!("    +{:.1} s: {sent} of {flows} first reminders sent", secs(restarted));
            next_progress += PROGRESS_EVERY;
        }
        if now_ms() >= until_ms {
            let missing: Vec<String> =
                deadlines.keys().filter(|c| reminders.first(c).is_none()).take(5).cloned().collect();
            bail!(
                "only {sent} of {flows} first reminders were sent by {SLACK:?} after the latest deadline \
                 ({:.1} s after the restart); missing e.g. {missing:?}",
                secs(restarted)
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let rss_peak = rss_mib(cluster.pid(NODE), "VmHWM:");
    activations.add(&tail.read_new()?, Email::ACTIVATION);

    // Figures.
    let mut lateness: Vec<i64> = deadlines
        .iter()
        .filter_map(|(c, deadline)| reminders.first(c).map(|sent| sent as i64 - *deadline as i64))
        .collect();
    lateness.sort_unstable();
    let last_ms = deadlines.keys().filter_map(|c| reminders.first(c)).max().unwrap_or(restart_ms);
    let first_ms = deadlines.keys().filter_map(|c| reminders.first(c)).min().unwrap_or(restart_ms);
    let reminded_twice = reminders.twice_within(interval);
    let second_reminders = reminders.extra().saturating_sub(reminded_twice);
    let activated_twice = activations.twice_within(u64::MAX);
    let (p50, p99) = (quantile(&lateness, 0.50), quantile(&lateness, 0.99));
    let (min, max) = (lateness.first().copied().unwrap_or(0), lateness.last().copied().unwrap_or(0));
    let late_1s = lateness.iter().filter(|l| **l > 1_000).count();
    println!(
        "  {} of {flows} signups sent their first reminder ({reminded_twice} twice, {second_reminders} second reminders already due, {activated_twice} activation mails twice)",
        reminders.customers()
    );
    println!(
        "  reminders from {:+.1} s to {:+.1} s after the restart; lateness past the deadline: p50 {p50} ms, p99 {p99} ms, max {max} ms (min {min} ms; {late_1s} more than 1 s late)",
        rel(first_ms) as f64 / 1000.0,
        rel(last_ms) as f64 / 1000.0,
    );
    let mib = |r: Option<f64>| r.map(|r| (r * 10.0).round() / 10.0);
    println!(
        "  node RSS: {} MiB with {flows} suspended before the kill; after the restart max {rss_max:.0} MiB sampled, peak (VmHWM) {} MiB",
        mib(rss_suspended).map_or_else(|| "?".to_string(), |r| r.to_string()),
        mib(rss_peak).map_or_else(|| "?".to_string(), |r| r.to_string()),
    );
    println!(
        "{}",
        json!({
            "nodes": 1,
            "shards": 1,
            "flows": flows,
            "interval_ms": interval,
            "start_s": (started_s * 10.0).round() / 10.0,
            "ready_after_restart_ms": ready_ms,
            "earliest_deadline_after_restart_ms": rel(earliest),
            "latest_deadline_after_restart_ms": rel(latest),
            "reminders_sent": reminders.customers(),
            "reminded_twice": reminded_twice,
            "activated_twice": activated_twice,
            "last_reminder_after_restart_ms": rel(last_ms),
            "lateness_p50_ms": p50,
            "lateness_p99_ms": p99,
            "lateness_max_ms": max,
            "rss_suspended_mib": mib(rss_suspended),
            "rss_after_restart_max_mib": (rss_max * 10.0).round() / 10.0,
            "rss_peak_after_restart_mib": mib(rss_peak),
        })
    );
    if reminders.customers() < n || reminded_twice > 0 || activated_twice > 0 {
        bail!(
            "{} of {flows} signups reminded, {reminded_twice} reminded twice, {activated_twice} activated twice",
            reminders.customers()
        );
    }
    Ok(())
}
