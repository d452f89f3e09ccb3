//! The cluster with real processes: `shop-node` (the `shop` program) nodes on loopback ports,
//! killed, frozen and restarted while flows run; checked against the flows' final states and the
//! fake services' ledger.
//!
//! Set `FETTER_KILL_SEED` to replay the moment of a kill; the seed is printed either way.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use fetter_tests::{check_orders, order_input, wait_all_finished, TestCluster, WAIT};
use rand::{Rng, SeedableRng};

const EXE: &str = env!("CARGO_BIN_EXE_shop-node");

fn seed() -> u64 {
    let seed =
        std::env::var("FETTER_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("FETTER_KILL_SEED={seed}");
    seed
}

/// Starts orders `o-1..=o-n` through `client`, at most `in_flight` calls at a time.
async fn start_orders(client: &fetter::Client, range: std::ops::RangeInclusive<u32>) -> Result<()> {
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in range {
        let client = client.clone();
        let permit = sem.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            client.start_flow("order", &format!("o-{i}"), &order_input(i), false, None).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn finished_count(client: &fetter::Client, n: u32) -> usize {
    let mut done = 0;
    for i in 1..=n {
        if let Ok(f) = client.get_flow("order", &format!("o-{i}")).await {
            if matches!(f.status.as_str(), "succeeded" | "failed" | "cancelled") {
                done += 1;
            }
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_kill_9_of_the_busiest_leader() -> Result<()> {
    const ORDERS: u32 = 300;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let mut c = TestCluster::start(EXE, 3, &["--service-latency-ms", "20"]).await?;
    let client = c.client()?;
    // Kill once between a third and two thirds of the orders have been started.
    let kill_after: u32 = rng.random_range(ORDERS / 3..ORDERS * 2 / 3);
    start_orders(&client, 1..=kill_after).await?;
    let victim = c.busiest_leader().await?;
    let in_flight = kill_after as usize - finished_count(&client, kill_after).await;
    println!("kill -9 node {victim} after {kill_after} orders started, {in_flight} in flight");
    c.local.kill(victim).await.map_err(|e| anyhow!(e))?;
    start_orders(&client, kill_after + 1..=ORDERS).await?;
    let instances: Vec<String> = (1..=ORDERS).map(|i| format!("o-{i}")).collect();
    let flows = match wait_all_finished(&client, "order", &instances).await {
        Ok(flows) => flows,
        Err(e) => return Err(anyhow!("{e}\n{}", c.logs())),
    };
    let (ok, failed) = check_orders(&flows, &c.ledger()?, 0.95)?;
    println!("{ok} succeeded, {failed} failed with effect_outcome_unknown on ship");
    // The killed node comes back and catches up.
    c.local.start(victim).await.map_err(|e| anyhow!(e))?;
    c.wait_ready().await?;
    let status = c.status().await?;
    ensure!(status.members.iter().all(|m| m.alive), "every node alive again: {:?}", status.members);
    c.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_through_a_non_leader_arrives_exactly_once() -> Result<()> {
    let c = TestCluster::start(EXE, 3, &[]).await?;
    let client = c.client()?;
    let input = serde_json::json!({"customer_id": "c-1", "email": "ada@example.org"}).to_string();
    client.start_flow("signup", "s-1", &input, false, None).await?;
    let flow = client.get_flow("signup", "s-1").await?;
    let leader = flow.leader_node.ok_or_else(|| anyhow!("no leader"))?;
    let other = c.local.ids().into_iter().find(|id| *id != leader).ok_or_else(|| anyhow!("no follower"))?;
    let via = c.client_of(other)?;
    // The same key twice (a client retry), through a node that does not lead the flow's shard.
    for _ in 0..2 {
        via.send_message("signup", "s-1", "EmailVerified", "{}", Some("verify-1".into())).await?;
    }
    let flows = wait_all_finished(&client, "signup", &["s-1".to_string()]).await?;
    ensure!(flows[0].status == "succeeded", "{:?}", flows[0]);
    let messages =
        flows[0].events.iter().filter(|e| e.kind == "message" && e.name == "EmailVerified").count();
    ensure!(messages == 1, "one EmailVerified in the log, found {messages}");
    c.stop().await;
    Ok(())
}

fn shop(args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(EXE).args(args).stdin(Stdio::null()).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_the_cluster_keeps_serving() -> Result<()> {
    let mut c = TestCluster::start(EXE, 3, &["--max-payload-bytes", "4096"]).await?;
    let addr = c.local.addr(2);
    let client = c.client()?;
    let order = order_input(1);
    let big = serde_json::json!({"blob": "x".repeat(10_000)}).to_string();
    // Over gRPC: each refused with its reason, nothing stored.
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        ("order", "bad-json", "{not json", "not valid JSON"),
        ("no-such-type", "x", "{}", "unknown flow type"),
        ("order", "too-big", &big, "over the limit"),
    ];
    for (flow_type, instance, input, expect) in &cases {
        let err = client.start_flow(flow_type, instance, input, false, None).await.err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        ensure!(msg.contains(expect), "{flow_type}/{instance}: expected {expect:?}, got {msg:?}");
    }
    let missing = client.get_flow("order", "nobody").await.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(missing.contains("not found"), "unknown instance: {missing:?}");
    let listed = client.list_flows(None, None, 100, None).await?;
    ensure!(listed.flows.is_empty(), "nothing was stored: {:?}", listed.flows);
    // Over the CLI: exit code 1 and the reason on stderr; 2 for a usage error.
    let (code, _, err) = shop(&["--addr", &addr, "flow", "start", "order", "o-x", "--input", "{nope"])?;
    ensure!(code == 1 && err.contains("JSON"), "CLI malformed JSON: {code} {err}");
    let (code, _, err) = shop(&["--addr", &addr, "flow", "start", "nope", "o-x", "--input", "{}"])?;
    ensure!(code == 1 && err.contains("unknown flow type"), "CLI unknown type: {code} {err}");
    let (code, _, err) = shop(&["--addr", &addr, "flow", "get", "order", "nobody"])?;
    ensure!(code == 1 && err.contains("not found"), "CLI unknown instance: {code} {err}");
    let (code, _, _) = shop(&["--addr", &addr, "flow", "frobnicate"])?;
    ensure!(code == 2, "CLI usage error exits 2, got {code}");
    // A node started with a member list that contradicts the cluster's is refused.
    let port = fetter_tests::free_ports(1)?;
    let peers = format!("1={},4=127.0.0.1:{port}", c.local.addr(1));
    let dir = tempfile::tempdir()?;
    let mut args = vec!["node".to_string(), "--id".into(), "4".into(), "--listen".into()];
    args.extend([format!("127.0.0.1:{port}"), "--data-dir".into(), dir.path().display().to_string()]);
    args.extend(["--peers".into(), peers, "--shards".into(), "6".into()]);
    c.local.spawn(4, args).map_err(|e| anyhow!(e))?;
    let code = c.local.wait_exit(4, WAIT).await.map_err(|e| anyhow!(e))?;
    let log = std::fs::read_to_string(c.local.log_file(4))?;
    ensure!(code == Some(1) && log.contains("contradict"), "contradicting --peers: {code:?} {log}");
    // Still serving.
    let created = client.start_flow("order", "o-1", &order, true, Some(Duration::from_secs(60))).await?;
    ensure!(created.flow.is_some_and(|f| f.status == "succeeded"), "an order still runs to completion");
    c.stop().await;
    Ok(())
}
