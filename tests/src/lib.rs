//! # fetter-tests — cross-crate integration tests
//!
//! The harness of the multi-process tests: [`TestCluster`] runs real `shop` node processes (the
//! package's `shop-node` binary, the same program as `examples`' `shop`) on free loopback ports
//! with their own temp directories and a shared ledger of the fake services, and offers the
//! checks the tests share (every order finished, the ledger's shipments). Tests of one crate live
//! in that crate; these are the ones that span the whole system (`tests/tests/cluster.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use fetter::local::LocalCluster;
use fetter::proto;
use fetter::Client;
use fetter_examples::ledger::{Ledger, LedgerEntry};

pub mod net;

/// Bound on every wait of the harness.
pub const WAIT: Duration = Duration::from_secs(120);

/// `n` consecutive free loopback ports ([`fetter::local::free_base_port`]).
pub fn free_ports(n: u16) -> Result<u16> {
    Ok(fetter::local::free_base_port(n)?)
}

/// One multi-process cluster at a time: tests on a 2-core machine stay honest about timing.
static ONE_AT_A_TIME: std::sync::LazyLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(Default::default);

/// A local cluster of real node processes for one test.
pub struct TestCluster {
    /// The processes.
    pub local: LocalCluster,
    /// The fake services' shared ledger.
    pub ledger: PathBuf,
    dir: tempfile::TempDir,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl TestCluster {
    /// Starts `nodes` nodes of `exe` (relaxed Raft timing, 6 shards) and waits until every
    /// shard has a leader. `node_args` go to every node.
    pub async fn start(exe: &str, nodes: u64, node_args: &[&str]) -> Result<TestCluster> {
        // Two spare ports for nodes a test adds later.
        let base = free_ports(nodes as u16 + 2)?;
        TestCluster::start_at(exe, nodes, base, node_args).await
    }

    /// [`TestCluster::start`] with node `i` on port `base + i - 1` (a test that runs two
    /// clusters on the same ports, one after the other, picks the ports itself).
    pub async fn start_at(exe: &str, nodes: u64, base: u16, node_args: &[&str]) -> Result<TestCluster> {
        TestCluster::start_with(exe, nodes, node_args, |local| local.base_port(base)).await
    }

    /// [`TestCluster::start`] with each node on its own loopback address (`127.0.1.N`, see
    /// [`LocalCluster::own_addresses`]), for a test that cuts the network between them ([`net`]).
    pub async fn start_own_addresses(exe: &str, nodes: u64, node_args: &[&str]) -> Result<TestCluster> {
        TestCluster::start_with(exe, nodes, node_args, |local| local.own_addresses(true)).await
    }

    async fn start_with(
        exe: &str,
        nodes: u64,
        node_args: &[&str],
        place: impl FnOnce(LocalCluster) -> LocalCluster,
    ) -> Result<TestCluster> {
        let turn = ONE_AT_A_TIME.clone().lock_owned().await;
        let dir = tempfile::tempdir()?;
        let ledger = dir.path().join("ledger.jsonl");
        let mut args: Vec<String> = vec!["--ledger".into(), ledger.display().to_string()];
        args.extend(node_args.iter().map(|s| s.to_string()));
        let mut local = place(LocalCluster::new(exe, dir.path().join("cluster"), nodes))
            .shards(6)
            .timing("relaxed")
            .node_args(args);
        local.start_all().await.map_err(|e| anyhow!(e))?;
        let mut c = TestCluster { local, ledger, dir, _turn: turn };
        c.wait_ready().await?;
        Ok(c)
    }

    /// Waits until every running node is alive and every shard has a leader.
    pub async fn wait_ready(&mut self) -> Result<()> {
        if let Err(e) = self.local.wait_ready(WAIT).await {
            bail!("{e}\n{}", self.logs());
        }
        Ok(())
    }

    /// A client of every node.
    pub fn client(&self) -> Result<Client> {
        self.local.client().map_err(|e| anyhow!(e))
    }

    /// A client of node `id` only.
    pub fn client_of(&self, id: u64) -> Result<Client> {
        Client::connect([self.local.addr(id)]).map_err(|e| anyhow!("{e}"))
    }

    /// The cluster's status, from any node.
    pub async fn status(&self) -> Result<proto::ClusterStatusResponse> {
        Ok(self.client()?.cluster_status().await?)
    }

    /// Shards led per node (nodes leading none included if alive).
    pub async fn leaders_per_node(&self) -> Result<BTreeMap<u64, usize>> {
        Ok(self.status().await?.leaders_per_node())
    }

    /// The node leading the most shards.
    pub async fn busiest_leader(&self) -> Result<u64> {
        let per = self.leaders_per_node().await?;
        per.iter().max_by_key(|(_, n)| **n).map(|(id, _)| *id).ok_or_else(|| anyhow!("no leaders"))
    }

    /// The tail of every node's log (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.local.ids() {
            let text = std::fs::read_to_string(self.local.log_file(id)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- node {id} (last lines) ---\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Every ledger entry so far.
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        if !self.ledger.exists() {
            return Ok(Vec::new());
        }
        Ledger::read_all(&self.ledger).context("reading the ledger")
    }

    /// Stops every node.
    pub async fn stop(mut self) {
        self.local.stop_all().await;
    }

    /// Stops every node and hands over the directory that holds their data (node `i`'s in
    /// `cluster/node-i`), which would otherwise be deleted; the next cluster may start.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.local.stop_all().await;
        self.dir
    }
}

/// An order input of the public contract.
pub fn order_input(i: u32) -> String {
    serde_json::json!({
        "order_id": format!("o-{i}"),
        "customer_id": format!("c-{}", i % 17),
        "total_cents": 1_000 + i,
        "products": ["p-1", "p-2"],
    })
    .to_string()
}

/// Waits until every listed flow has finished; returns them.
pub async fn wait_all_finished(
    client: &Client,
    flow_type: &str,
    instances: &[String],
) -> Result<Vec<proto::Flow>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut done: BTreeMap<String, proto::Flow> = BTreeMap::new();
    loop {
        let pending: Vec<&String> = instances.iter().filter(|i| !done.contains_key(*i)).collect();
        for instance in pending {
            match client.get_flow(flow_type, instance).await {
                Ok(flow) if matches!(flow.status.as_str(), "succeeded" | "failed" | "cancelled") => {
                    done.insert(instance.clone(), flow);
                }
                Ok(_) => {}
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                }
                Err(e) => return Err(anyhow!("{flow_type}/{instance}: {e}")),
            }
        }
        if done.len() == instances.len() {
            return Ok(instances.iter().filter_map(|i| done.remove(i)).collect());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{} of {} {flow_type} flows finished within {WAIT:?}",
            done.len(),
            instances.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The contract after failures: every order `succeeded`, or `failed` with
/// `effect_outcome_unknown` on `ship`; at least `min_success` of them succeeded; no order
/// shipped twice and every succeeded order shipped exactly once; no refund for an order whose
/// shipment is unknown. Returns (succeeded, failed).
pub fn check_orders(
    flows: &[proto::Flow],
    ledger: &[LedgerEntry],
    min_success: f64,
) -> Result<(usize, usize)> {
    let mut ships: BTreeMap<&str, usize> = BTreeMap::new();
    for e in ledger.iter().filter(|e| e.service == "logistics" && e.op == "ship") {
        *ships.entry(e.flow.as_str()).or_default() += 1;
    }
    let refunded: std::collections::BTreeSet<&str> = ledger
        .iter()
        .filter(|e| e.service == "payment" && e.op == "cancel")
        .map(|e| e.flow.as_str())
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for f in flows {
        let name = format!("{}/{}", f.flow_type, f.instance);
        let shipped = ships.get(name.as_str()).copied().unwrap_or(0);
        ensure!(shipped <= 1, "{name} shipped {shipped} times");
        match f.status.as_str() {
            "succeeded" => {
                ensure!(shipped == 1, "{name} succeeded but shipped {shipped} times");
                ok += 1;
            }
            "failed" => {
                ensure!(
                    f.error_kind.as_deref() == Some("effect_outcome_unknown")
                        && f.error.as_deref().is_some_and(|e| e.contains("ship")),
                    "{name} failed with {:?}: {:?}",
                    f.error_kind,
                    f.error
                );
                ensure!(
                    !refunded.contains(name.as_str()),
                    "{name}: refunded although its shipment is unknown"
                );
                failed += 1;
            }
            other => bail!("{name} ended {other}"),
        }
    }
    let share = ok as f64 / flows.len().max(1) as f64;
    ensure!(share >= min_success, "only {ok} of {} orders succeeded", flows.len());
    Ok((ok, failed))
}
