//! `shop run-batch` survives `kill -9`: a real child process, killed at seeded random moments
//! while orders are in flight, restarted on the same directory until the batch finishes. Then the
//! ledger of the fake services proves nothing was lost or repeated.
//!
//! Set `FETTER_KILL_SEED` to replay a run; the seed is printed either way.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fetter_examples::ledger::Ledger;
use rand::{Rng, SeedableRng};

const ORDERS: u32 = 200;
const KILLS: usize = 5;
const MIN_IN_FLIGHT: u32 = 20;
const RUN_WAIT: Duration = Duration::from_secs(120);

fn shop(dir: &Path, ledger: &Path) -> Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_shop"))
        .args([
            "run-batch",
            "--orders",
            &ORDERS.to_string(),
            "--concurrency",
            "25",
            "--service-latency-ms",
            "40",
        ])
        .arg("--data-dir")
        .arg(dir)
        .arg("--ledger")
        .arg(ledger)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn shop")
}

/// Lines of the child's stdout, on a channel (so that waits can be bounded).
fn lines(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn progress(line: &str) -> Option<(u32, u32)> {
    let rest = line.strip_prefix("progress: started=")?;
    let (started, finished) = rest.split_once(" finished=")?;
    Some((started.parse().ok()?, finished.parse().ok()?))
}

#[test]
fn run_batch_survives_kill_9_and_ships_every_order_at_most_once() -> Result<()> {
    let seed: u64 = match std::env::var("FETTER_KILL_SEED") {
        Ok(s) => s.parse().context("FETTER_KILL_SEED")?,
        Err(_) => rand::random(),
    };
    println!("seed: {seed} (replay with FETTER_KILL_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ledger = dir.path().join("ledger.jsonl");

    let mut kills = 0;
    let mut runs = 0;
    let outcome = loop {
        runs += 1;
        ensure!(runs <= 50, "the batch did not finish in 50 runs");
        let mut child = shop(&data, &ledger)?;
        let rx = lines(&mut child)?;
        // Kill once at least MIN_IN_FLIGHT orders are in flight and a random number of further
        // progress reports has gone by.
        let mut skip: u32 = rng.random_range(0..4);
        let started_at = Instant::now();
        let mut done = None;
        loop {
            let line = match rx.recv_timeout(RUN_WAIT.saturating_sub(started_at.elapsed())) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    bail!("shop printed nothing for {RUN_WAIT:?}");
                }
            };
            if line.starts_with("done:") {
                done = Some(line);
                break;
            }
            if kills >= KILLS {
                continue;
            }
            if let Some((started, finished)) = progress(&line) {
                if started.saturating_sub(finished) >= MIN_IN_FLIGHT {
                    if skip == 0 {
                        child.kill().context("kill -9")?; // SIGKILL
                        kills += 1;
                        println!("run {runs}: killed with {} in flight", started - finished);
                        break;
                    }
                    skip -= 1;
                }
            }
        }
        let status = child.wait()?;
        if let Some(done) = done {
            ensure!(status.success(), "shop exited with {status}");
            break done;
        }
    };
    println!("{outcome} after {runs} runs and {kills} kills");
    ensure!(kills >= KILLS, "only {kills} kills happened (the batch finished too early)");

    // The ledger: what really reached the fake services.
    let entries = Ledger::read_all(&ledger)?;
    let mut calls: HashMap<(String, String), usize> = HashMap::new();
    for e in &entries {
        *calls.entry((e.flow.clone(), format!("{}/{}", e.service, e.op))).or_default() += 1;
    }
    let count = |flow: &str, op: &str| calls.get(&(flow.to_string(), op.to_string())).copied().unwrap_or(0);
    // The final statuses, from the journal, through a node opened on the same directory.
    let statuses = final_statuses(&data)?;
    let mut succeeded = 0;
    for i in 1..=ORDERS {
        let flow = format!("order/o-{i}");
        let (status, error_kind) = statuses.get(&flow).cloned().ok_or_else(|| anyhow!("{flow} missing"))?;
        let ships = count(&flow, "logistics/ship");
        ensure!(ships <= 1, "{flow} shipped {ships} times");
        match status.as_str() {
            "Succeeded" => {
                succeeded += 1;
                ensure!(ships == 1, "{flow} succeeded but shipped {ships} times");
            }
            "Failed" => {
                ensure!(
                    error_kind.as_deref() == Some("effect_outcome_unknown"),
                    "{flow} failed with {error_kind:?}"
                );
                ensure!(
                    count(&flow, "payment/cancel") == 0,
                    "{flow}: refund with the shipment outcome unknown"
                );
            }
            other => bail!("{flow} ended {other}"),
        }
    }
    println!("{succeeded} of {ORDERS} succeeded");
    ensure!(succeeded * 100 >= ORDERS * 95, "only {succeeded} of {ORDERS} succeeded");
    Ok(())
}

/// flow -> (status, error kind), read by opening the data directory in-process.
fn final_statuses(data: &Path) -> Result<HashMap<String, (String, Option<String>)>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        use fetter::prelude::*;
        let engine = open_engine(data).await?;
        let mut out = HashMap::new();
        let mut query = ListQuery { flow_type: Some("order".into()), limit: 500, ..ListQuery::default() };
        loop {
            let page = engine.panel().list(&query).await?;
            let Some(last) = page.last() else { break };
            query.after = Some(last.id.clone());
            for r in page {
                let status = format!("{:?}", r.status);
                out.insert(r.id.to_string(), (status, r.error.map(|e| e.kind)));
            }
        }
        engine.shutdown().await;
        Ok(out)
    })
}

async fn open_engine(data: &Path) -> Result<fetter::Engine> {
    // No flows registered: reading must not run anything (nothing is left to run anyway).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fetter::Engine::start(fetter::EngineConfig::new(data), fetter::prelude::Registry::new()).await {
            Ok(engine) => return Ok(engine),
            Err(e) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}
