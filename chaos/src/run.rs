//! One chaos run: a cluster of node processes (this program's `node` command: the `shop`
//! application with its fake services writing the run's ledger), a workload through the public
//! API recorded as a history, the seeded faults, the final heal, the final state, the checker
//! and the report.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fetter::client::ClientError;
use fetter::local::{LocalCluster, Signal};
use fetter::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{
    self, ControlAction, DigestRecord, FaultKind, FaultRecord, FinalFlow, Op, OpRecord, Phase,
    PlacementRecord, Recorder,
};
use crate::net;
use crate::schedule::{self, Planned, Profile, Target};

/// How long the harness, as an operator, keeps asking to remove a lost node.
const REMOVE_NODE_WITHIN: Duration = Duration::from_secs(300);

/// Shards of the run's cluster.
const SHARDS: u32 = 6;
/// Client tasks of the workload.
const WORKERS: u32 = 8;
/// Bound on every wait of the harness (readiness, the final state).
const WAIT: Duration = Duration::from_secs(180);
/// One client call's budget, retries across nodes included.
const CALL: Duration = Duration::from_secs(10);

/// What `run` was asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Nodes (3 or 5).
    pub nodes: u64,
    /// The seed of the fault schedule and the workload.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// Kernel partitions (needs root and a private network namespace).
    pub partitions: bool,
    /// The run directory.
    pub out: PathBuf,
    /// Whether nodes are lost and replaced.
    pub replacements: bool,
    /// A bug to plant in every node (`fetter_actors::bugs::BUGS`), to see the checker catch it.
    pub plant_bug: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The cluster of one run and what its faults need.
struct Cluster {
    local: LocalCluster,
    partitions: bool,
    /// The current members (a replaced node leaves, its successor joins).
    members: Vec<u64>,
    /// The id the next joining node gets.
    next_id: u64,
}

impl Cluster {
    /// A client of the current members.
    fn client(&self) -> Result<Client> {
        Ok(Client::connect(self.members.iter().map(|id| self.local.addr(*id)))?.with_timeout(CALL))
    }

    /// Until every member is alive and every shard has a leader and 3 replicas, all members.
    async fn wait_members_ready(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        let client = self.client()?;
        loop {
            if let Ok(status) = client.cluster_status().await {
                let alive: Vec<u64> = status.members.iter().filter(|m| m.alive).map(|m| m.id).collect();
                let placed = status.shards.iter().all(|s| {
                    s.leader.is_some()
                        && s.replicas.iter().all(|r| self.members.contains(r))
                        && s.replicas.len() >= 3.min(self.members.len())
                });
                if alive.len() == self.members.len()
                    && self.members.iter().all(|m| alive.contains(m))
                    && placed
                {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!(
                        "members {:?} not all alive with every shard placed on them: {status:?}",
                        self.members
                    );
                }
            } else if Instant::now() > deadline {
                bail!("no member answered cluster status");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Node `node` is lost with its disk: killed, its data deleted, removed from the cluster
    /// through another member, and a new node with a new id joins in its place. The fault ends
    /// once the successor is ready with every shard placed on the members ([`Cluster::heal`]).
    async fn replace(&mut self, node: u64) -> Result<u64> {
        self.local.kill(node).await.map_err(|e| anyhow!(e))?;
        let _ = std::fs::remove_dir_all(self.local.node_dir(node));
        self.members.retain(|m| *m != node);
        let client = self.client()?;
        // As an operator would: a membership change under faults can outlast one attempt (its
        // learner catching up, a group electing), so the call is repeated until it is done — a
        // repeat after it was done answers "not a member". Bounded.
        let deadline = Instant::now() + REMOVE_NODE_WITHIN;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match client.remove_node(node).await {
                Ok(()) | Err(ClientError::NotFound(_)) => break,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("remove-node {node} (attempt {attempts}) did not finish, again: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    bail!("remove-node {node}: {attempts} attempts in {REMOVE_NODE_WITHIN:?}, last: {e}")
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let via = self.local.addr(self.members[0]);
        let args = self.local.join_command(id, &via);
        self.local.spawn(id, args).map_err(|e| anyhow!(e))?;
        self.members.push(id);
        Ok(id)
    }

    fn ips(&self, ids: &[u64]) -> Vec<String> {
        ids.iter().map(|id| self.local.ip(*id)).collect()
    }

    async fn busiest_leader(&self) -> Option<u64> {
        let client = self.client().ok()?.with_timeout(Duration::from_secs(3));
        let status = client.cluster_status().await.ok()?;
        status.leaders_per_node().into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id)
    }

    async fn resolve(&self, target: Target) -> u64 {
        let first = self.members.first().copied().unwrap_or(1);
        match target {
            // The n-th current member (node ids change as nodes are replaced).
            Target::Node(n) => self
                .members
                .get((n as usize).saturating_sub(1) % self.members.len().max(1))
                .copied()
                .unwrap_or(first),
            Target::BusiestLeader => {
                self.busiest_leader().await.filter(|n| self.members.contains(n)).unwrap_or(first)
            }
        }
    }

    /// Starts `planned` on `node`; returns what to record.
    async fn inject(&mut self, planned: &Planned, node: u64) -> Result<FaultKind> {
        let e = |e: String| anyhow!(e);
        Ok(match planned {
            Planned::Kill { .. } => {
                self.local.kill(node).await.map_err(e)?;
                FaultKind::Kill { node }
            }
            Planned::Pause { .. } => {
                self.local.signal(node, Signal::Stop).map_err(e)?;
                FaultKind::Pause { node }
            }
            Planned::Terminate { .. } => {
                // Not waited for here: a graceful stop hands leadership over while the run goes on.
                self.local.signal(node, Signal::Term).map_err(e)?;
                FaultKind::Terminate { node }
            }
            Planned::Lossy { .. } => {
                net::lossy(&self.local.ip(node))?;
                FaultKind::Lossy { node }
            }
            Planned::Isolate { one_way, .. } => {
                let others: Vec<u64> = self.members.iter().copied().filter(|id| *id != node).collect();
                net::cut(&self.ips(&[node]), &self.ips(&others), *one_way)?;
                FaultKind::Partition { a: vec![node], b: others, one_way: *one_way }
            }
            Planned::Replace { .. } => {
                let by = self.replace(node).await?;
                FaultKind::Replace { node, by }
            }
            Planned::Bridge { .. } => {
                let others: Vec<u64> = self.members.iter().copied().filter(|id| *id != node).collect();
                let (a, b) = others.split_at(others.len() / 2);
                net::cut(&self.ips(a), &self.ips(b), false)?;
                FaultKind::Partition { a: a.to_vec(), b: b.to_vec(), one_way: false }
            }
            Planned::Double { .. } => bail!("a double fault is injected as its two parts"),
        })
    }

    /// Ends `kind`.
    async fn heal(&mut self, kind: &FaultKind) -> Result<()> {
        let e = |e: String| anyhow!(e);
        match kind {
            FaultKind::Kill { node } => self.local.restart(*node).await.map_err(e)?,
            FaultKind::Pause { node } => {
                self.local.signal(*node, Signal::Cont).map_err(e)?;
                // Evidence for the run's log should a node stay stopped after SIGCONT.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(pid) = self.local.pid(*node) {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')) {
                        println!("node {node} (pid {pid}) is still stopped 50 ms after SIGCONT");
                    }
                }
            }
            FaultKind::Terminate { node } => {
                let (exited, _) =
                    self.local.terminate(*node, Duration::from_secs(20)).await.unwrap_or((false, None));
                if !exited {
                    eprintln!("node {node} did not stop within 20 s of SIGTERM; killed");
                }
                self.local.restart(*node).await.map_err(e)?;
            }
            // Permanent: the new node took the old one's place when the fault began; the fault
            // lasts until the replicas have moved (or not: the final placement check says so).
            FaultKind::Replace { node, by } => {
                if let Err(e) = self.wait_members_ready().await {
                    println!("the replacement of node {node} by node {by} did not settle: {e}");
                }
            }
            FaultKind::Partition { .. } => net::heal()?,
            FaultKind::Lossy { .. } => net::unlossy()?,
        }
        Ok(())
    }

    /// Every node running and connected.
    async fn heal_all(&mut self) -> Result<()> {
        if self.partitions {
            net::heal()?;
            net::unlossy()?;
        }
        for id in self.members.clone() {
            let _ = self.local.signal(id, Signal::Cont);
            if !self.local.is_running(id) {
                self.local.restart(id).await.map_err(|e| anyhow!(e))?;
            }
        }
        // A cluster that does not settle is the checker's finding (`replicas_restored`), not
        // the end of the run.
        if let Err(e) = self.wait_members_ready().await {
            println!("after the final heal: {e}");
        }
        Ok(())
    }

    /// Before a failed run's teardown: each running member that does not answer a direct call
    /// within a few seconds gets its process state and every thread's stack (by `gdb`, when
    /// installed) written to `stacks-node-<id>.txt` in the run directory, so a node that hung
    /// can be diagnosed after the fact.
    async fn diagnose(&mut self, out: &Path) {
        for id in self.members.clone() {
            let Some(pid) = self.local.pid(id) else { continue };
            if !self.local.is_running(id) {
                continue;
            }
            let probe = match Client::connect([self.local.addr(id)]) {
                Ok(client) => client.with_timeout(Duration::from_secs(5)).node_info().await.map(|_| ()),
                Err(e) => Err(e),
            };
            let Err(e) = probe else { continue };
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim().chars().next().unwrap_or('?')))
                .unwrap_or('?');
            let mut text = format!("node {id} (pid {pid}, state {state}) did not answer: {e}\n\n");
            match std::process::Command::new("gdb")
                .args(["-batch", "-p", &pid.to_string(), "-ex", "thread apply all bt"])
                .output()
            {
                Ok(o) => {
                    text.push_str(&String::from_utf8_lossy(&o.stdout));
                    text.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => text.push_str(&format!("no stacks: cannot run gdb: {e}\n")),
            }
            let file = out.join(format!("stacks-node-{id}.txt"));
            println!("node {id} (pid {pid}, state {state}) did not answer; stacks in {}", file.display());
            let _ = std::fs::write(&file, text);
        }
    }

    /// Every shard's leader and replicas as cluster status shows them now.
    async fn placement(&self) -> Result<Vec<PlacementRecord>> {
        let status = self.client()?.cluster_status().await.map_err(|e| anyhow!("cluster status: {e}"))?;
        Ok(status
            .shards
            .iter()
            .map(|s| PlacementRecord {
                shard: s.id,
                leader: s.leader,
                replicas: s.replicas.clone(),
                members: self.members.clone(),
            })
            .collect())
    }
}

/// Runs the faults of the schedule until it ends or `stop` is set.
async fn faults(
    cluster: &mut Cluster,
    steps: Vec<schedule::Step>,
    rec: Recorder,
    stop: Arc<AtomicBool>,
) -> Result<u64> {
    let mut n = 0;
    for step in steps {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(step.gap).await;
        let parts: Vec<&Planned> = match &step.fault {
            Planned::Double { first, second } => vec![first.as_ref(), second.as_ref()],
            other => vec![other],
        };
        let mut active = Vec::new();
        for planned in parts {
            let target = match planned {
                Planned::Kill { target }
                | Planned::Pause { target }
                | Planned::Terminate { target }
                | Planned::Lossy { target }
                | Planned::Replace { target }
                | Planned::Bridge { target }
                | Planned::Isolate { target, .. } => *target,
                Planned::Double { .. } => continue,
            };
            let node = cluster.resolve(target).await;
            if !cluster.local.is_running(node) {
                continue;
            }
            let start_ms = now_ms();
            let kind = cluster.inject(planned, node).await?;
            n += 1;
            let record = FaultRecord { id: n, start_ms, end_ms: None, kind: kind.clone() };
            rec.record(&record)?;
            println!("fault {n}: {}", serde_json::to_string(&record.kind)?);
            active.push(record);
        }
        tokio::time::sleep(step.down).await;
        for mut record in active {
            cluster.heal(&record.kind).await?;
            record.end_ms = Some(now_ms());
            rec.record(&record)?;
        }
        rec.flush()?;
    }
    Ok(n)
}

/// Whether a client error means the operation certainly did not take effect.
fn definite(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::InvalidArgument(_)
            | ClientError::NotFound(_)
            | ClientError::AlreadyExists(_)
            | ClientError::FailedPrecondition(_)
            | ClientError::ConcurrentModification(_)
            | ClientError::Json(_)
    )
}

/// How an operation ended, as the history records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged.
    Ok,
    /// Certainly did not take effect.
    Fail,
    /// Unknown: it may or may not have taken effect.
    Info,
}

/// Records `op`'s invoke, performs it through `client` (which asks `node` first) and records
/// its outcome: `ok`, `fail` when it certainly did not take effect, else `info`.
async fn perform(
    rec: &Recorder,
    ids: &AtomicU64,
    process: u32,
    node: u64,
    client: &Client,
    op: &Op,
) -> Result<Outcome> {
    let id = ids.fetch_add(1, Ordering::SeqCst);
    let record = |phase: Phase, error: Option<String>| OpRecord {
        id,
        t_ms: now_ms(),
        process,
        node,
        phase,
        op: op.clone(),
        error,
    };
    rec.record(&record(Phase::Invoke, None))?;
    let result = match op {
        Op::Start { flow_type, instance, input } => {
            client.start_flow(flow_type, instance, input, false, None).await.map(|_| ())
        }
        Op::Send { flow_type, instance, message_type, key, payload } => client
            .send_message(flow_type, instance, message_type, payload, Some(key.clone()))
            .await
            .map(|_| ()),
        Op::Control { flow_type, instance, action, expected_epoch } => match action {
            ControlAction::Restart => client.restart(flow_type, instance, None, false, *expected_epoch).await,
            ControlAction::Cancel => client.cancel(flow_type, instance, *expected_epoch).await,
            ControlAction::SetEffect { effect_id, value } => {
                client.set_effect(flow_type, instance, effect_id, value, *expected_epoch).await
            }
        }
        .map(|_| ()),
    };
    Ok(match &result {
        Ok(()) => {
            rec.record(&record(Phase::Ok, None))?;
            Outcome::Ok
        }
        Err(e) if definite(e) => {
            rec.record(&record(Phase::Fail, Some(e.to_string())))?;
            Outcome::Fail
        }
        Err(e) => {
            rec.record(&record(Phase::Info, Some(e.to_string())))?;
            Outcome::Info
        }
    })
}

/// The reply window of the loans the workload applies for.
const LOAN_WINDOW_MS: u64 = 2_500;

/// A service's reply message that the worker (playing the service) sends once it is due: a
/// credit bureau's to a loan application (some at once, often before the flow waits for
/// replies, most within the window, some after it), or payments' and logistics' to a
/// message-driven order (all sent ahead, in any order: a reply waits in the log until taken).
/// As a real service retries its callback, a reply whose delivery was not acknowledged is sent
/// again (same key) until it is, or until it is refused for good; the replies still due when
/// the faults end are delivered after the final heal ([`deliver_remaining`]).
/// The starts of referral flows are owed the same way (each one's rewards account waits for
/// it), but only once the account's own start was acknowledged (`after`): a message to a flow
/// that does not exist yet becomes a dead letter.
struct Reply {
    due: Instant,
    op: Op,
    /// The rewards account whose acknowledged start this waits for.
    after: Option<String>,
}

impl Reply {
    fn send(
        due: Instant,
        flow_type: &str,
        instance: &str,
        message_type: &str,
        payload: serde_json::Value,
        key: String,
    ) -> Reply {
        let op = Op::Send {
            flow_type: flow_type.into(),
            instance: instance.into(),
            message_type: message_type.into(),
            payload: payload.to_string(),
            key,
        };
        Reply { due, op, after: None }
    }

    /// Whether it may be sent now, given the rewards accounts whose starts were acknowledged.
    fn ready(&self, now: Instant, acked: &HashSet<String>) -> bool {
        self.due <= now && self.after.as_ref().is_none_or(|a| acked.contains(a))
    }

    fn op(&self) -> Op {
        self.op.clone()
    }
}

/// The share of orders an operator acts on through the control panel.
const CONTROL_SHARE: f64 = 0.1;

/// A control-panel operation on `order/<instance>`, as an operator would run it: a restart
/// (effects kept: they replay), a cancel, or the confirmation mail's effect set to done (the
/// customer was told another way); half of them with the epoch read just before (`--epoch`).
async fn control_op(rng: &mut StdRng, client: &Client, instance: &str) -> Op {
    let expected_epoch = if rng.random_bool(0.5) {
        client.get_flow("order", instance).await.ok().map(|f| f.epoch)
    } else {
        None
    };
    let action = match rng.random_range(0..10) {
        0..4 => ControlAction::Restart,
        4..7 => ControlAction::Cancel,
        _ => ControlAction::SetEffect { effect_id: "email".into(), value: "null".into() },
    };
    Op::Control { flow_type: "order".into(), instance: instance.into(), action, expected_epoch }
}

/// How long a service waits before it retries a reply whose delivery was not acknowledged.
const REPLY_RETRY: Duration = Duration::from_millis(500);

/// One client task: starts orders (RPC and message-driven, playing payments and logistics for
/// the latter), bulk batches of orders, newsletters, signups and loan applications, verifies
/// some signups and answers loans as their credit bureaus (replies duplicated through other
/// nodes), one operation at a time.
async fn worker(
    process: u32,
    seed: u64,
    clients: Vec<(u64, Client)>,
    rec: Recorder,
    ids: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<(u64, Vec<Reply>, HashSet<String>)> {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(process) << 32));
    let mut signups: Vec<String> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    let mut acked: HashSet<String> = HashSet::new();
    let mut done = 0;
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let (node, client) = &clients[rng.random_range(0..clients.len())];
        let now = Instant::now();
        let due = replies.iter().position(|r| r.ready(now, &acked));
        let mut sending = None;
        let op = if let Some(i) = due.filter(|_| rng.random_bool(0.7)) {
            let reply = replies.swap_remove(i);
            let op = reply.op();
            sending = Some(reply);
            op
        } else if !signups.is_empty() && rng.random_bool(0.3) {
            let instance = signups[rng.random_range(0..signups.len())].clone();
            let key = format!("verify-{instance}-{}", rng.random_range(0..2));
            Op::Send {
                flow_type: "signup".into(),
                instance,
                message_type: "EmailVerified".into(),
                payload: serde_json::json!({ "key": key }).to_string(),
                key,
            }
        } else if rng.random_bool(0.2) {
            let instance = format!("s-{process}-{n}");
            signups.push(instance.clone());
            let input = serde_json::json!({
                "customer_id": instance,
                "email": format!("{instance}@example.org"),
                "reminder_interval_ms": 2_000,
            });
            Op::Start { flow_type: "signup".into(), instance, input: input.to_string() }
        } else if rng.random_bool(0.02) {
            // A newsletter: mails at least once per recipient, in constant space.
            let instance = format!("n-{process}-{n}");
            let recipients: Vec<String> =
                (0..rng.random_range(5..20u64)).map(|i| format!("r{i}-{process}-{n}@example.org")).collect();
            let input = serde_json::json!({ "issue": instance, "recipients": recipients });
            Op::Start { flow_type: "newsletter".into(), instance, input: input.to_string() }
        } else if rng.random_bool(0.03) {
            // A bulk batch: its orders are child flows on every shard.
            let instance = format!("b-{process}-{n}");
            let orders: Vec<serde_json::Value> = (0..rng.random_range(3..9u64))
                .map(|i| {
                    serde_json::json!({
                        "order_id": format!("ob-{process}-{n}-{i}"),
                        "customer_id": format!("c-{}", (n + i) % 17),
                        "total_cents": 2_000 + i,
                        "products": ["p-1"],
                    })
                })
                .collect();
            let input = serde_json::json!({ "batch_id": instance, "orders": orders });
            Op::Start { flow_type: "bulk-orders".into(), instance, input: input.to_string() }
        } else if rng.random_bool(0.1) {
            // A message-driven order: the worker plays payments and logistics, answering ahead.
            let instance = format!("om-{process}-{n}");
            let shipment = if rng.random_bool(0.95) {
                ("ProductsShipped", serde_json::json!({ "tracking_id": format!("tt-{instance}") }))
            } else {
                ("ShipmentFailed", serde_json::json!({ "reason": "out of stock" }))
            };
            let answers = [
                ("FundsReserved", serde_json::json!({})),
                ("FundsCaptured", serde_json::json!({})),
                shipment,
            ];
            for (message_type, mut payload) in answers {
                let key = format!("{message_type}:{instance}");
                payload["key"] = serde_json::Value::String(key.clone());
                let due = Instant::now() + Duration::from_millis(rng.random_range(0..3_000));
                replies.push(Reply::send(due, "order-messaging", &instance, message_type, payload, key));
            }
            let input = serde_json::json!({
                "order_id": instance,
                "customer_id": format!("c-{}", n % 17),
                "total_cents": 3_000 + n,
                "products": ["p-1"],
            });
            Op::Start { flow_type: "order-messaging".into(), instance, input: input.to_string() }
        } else if rng.random_bool(0.04) {
            // A rewards account and its referrals: flows sending to a flow (through the outbox),
            // the referrals started once the account's start is acknowledged (owed until then).
            let instance = format!("w-{process}-{n}");
            let referrals = rng.random_range(2..5u32);
            for i in 0..referrals {
                let input = serde_json::json!({ "rewards": instance, "points": 10 * (u64::from(i) + 1) });
                let op = Op::Start {
                    flow_type: "referral".into(),
                    instance: format!("r-{process}-{n}-{i}"),
                    input: input.to_string(),
                };
                let due = Instant::now() + Duration::from_millis(rng.random_range(0..500));
                replies.push(Reply { due, op, after: Some(instance.clone()) });
            }
            let input = serde_json::json!({ "referrals": referrals });
            Op::Start { flow_type: "rewards".into(), instance, input: input.to_string() }
        } else if rng.random_bool(0.12) {
            let instance = format!("l-{process}-{n}");
            for bureau in ["bureau-a", "bureau-b", "bureau-c"] {
                if rng.random_bool(0.85) {
                    let after =
                        if rng.random_bool(0.2) { 0 } else { rng.random_range(0..LOAN_WINDOW_MS * 8 / 5) };
                    let key = format!("{bureau}:{instance}");
                    let payload =
                        serde_json::json!({ "bureau": bureau, "approved": rng.random_bool(0.9), "key": key });
                    let due = Instant::now() + Duration::from_millis(after);
                    replies.push(Reply::send(due, "loan", &instance, "CreditCheckOutcome", payload, key));
                }
            }
            let input = serde_json::json!({
                "application_id": instance,
                "customer_id": format!("c-{}", n % 17),
                "amount_cents": 100_000 + n,
                "reply_window_ms": LOAN_WINDOW_MS,
            });
            Op::Start { flow_type: "loan".into(), instance, input: input.to_string() }
        } else {
            let instance = format!("o-{process}-{n}");
            let input = serde_json::json!({
                "order_id": instance,
                "customer_id": format!("c-{}", n % 17),
                "total_cents": 1_000 + n,
                "products": ["p-1", "p-2"],
            });
            Op::Start { flow_type: "order".into(), instance, input: input.to_string() }
        };
        let outcome = perform(&rec, &ids, process, *node, client, &op).await?;
        // A rewards account's start: acknowledged, its referrals may go; unknown, it is retried
        // (the same input again is acknowledged); refused, it owes no referrals.
        if let Op::Start { flow_type, instance, .. } = &op {
            if flow_type == "rewards" {
                match outcome {
                    Outcome::Ok => {
                        acked.insert(instance.clone());
                    }
                    Outcome::Info if sending.is_none() => {
                        replies.push(Reply {
                            due: Instant::now() + REPLY_RETRY,
                            op: op.clone(),
                            after: None,
                        });
                    }
                    Outcome::Info => {}
                    Outcome::Fail => replies.retain(|r| r.after.as_ref() != Some(instance)),
                }
            }
        }
        // An operator's hand on a sample of orders, usually while they run.
        if let (Outcome::Ok, Op::Start { flow_type, instance, .. }) = (outcome, &op) {
            if flow_type == "order" && rng.random_bool(CONTROL_SHARE) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
                let op = control_op(&mut rng, client, instance).await;
                if perform(&rec, &ids, process, *node, client, &op).await? == Outcome::Ok {
                    done += 1;
                }
            }
        }
        match outcome {
            Outcome::Ok => done += 1,
            Outcome::Info => {
                if let Some(mut reply) = sending.take() {
                    reply.due = Instant::now() + REPLY_RETRY;
                    replies.push(reply);
                }
            }
            Outcome::Fail => {}
        }
        // A duplicate delivery of a message, through another node, now and then.
        if matches!(op, Op::Send { .. }) && rng.random_bool(0.3) {
            let (dup_node, dup) = &clients[rng.random_range(0..clients.len())];
            perform(&rec, &ids, process, *dup_node, dup, &op).await?;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
    Ok((done, replies, acked))
}

/// Delivers the replies the services still owed when the faults ended (each until it is
/// acknowledged or refused for good, as a service retrying its callback would), so that no
/// flow waits for ever on a message the harness never sent. Returns how many were acknowledged.
async fn deliver_remaining(
    mut replies: Vec<Reply>,
    mut acked: HashSet<String>,
    clients: &[(u64, Client)],
    rec: &Recorder,
    ids: &AtomicU64,
) -> Result<u64> {
    let deadline = Instant::now() + WAIT;
    let mut done = 0;
    let mut round = 0usize;
    let mut refused = HashSet::new();
    while !replies.is_empty() {
        if Instant::now() > deadline {
            println!("{} replies still not delivered {:?} after the final heal", replies.len(), WAIT);
            break;
        }
        let mut again = Vec::new();
        for reply in replies {
            // A referral whose account's start is not acknowledged yet waits for the next round.
            if !reply.ready(Instant::now(), &acked) {
                again.push(reply);
                continue;
            }
            let (node, client) = &clients[round % clients.len()];
            round += 1;
            let op = reply.op();
            match perform(rec, ids, WORKERS, *node, client, &op).await? {
                Outcome::Ok => {
                    done += 1;
                    if let Op::Start { flow_type, instance, .. } = &op {
                        if flow_type == "rewards" {
                            acked.insert(instance.clone());
                        }
                    }
                }
                Outcome::Fail => {
                    if let Op::Start { flow_type, instance, .. } = &op {
                        if flow_type == "rewards" {
                            refused.insert(instance.clone());
                        }
                    }
                }
                Outcome::Info => again.push(reply),
            }
        }
        // The referrals of an account whose start was refused are owed nothing.
        again.retain(|r| r.after.as_ref().is_none_or(|a| !refused.contains(a)));
        if !again.is_empty() {
            tokio::time::sleep(REPLY_RETRY).await;
        }
        replies = again;
    }
    Ok(done)
}

/// Every flow, read once all are terminal (or the wait ran out: then as they are).
async fn final_state(client: &Client, wanted: usize) -> Result<Vec<FinalFlow>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = client.list_flows(None, None, 1_000, cursor.as_deref()).await?;
            all.extend(page.flows);
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let open = all.iter().filter(|f| !history::terminal(&f.status)).count();
        if (open == 0 && all.len() >= wanted) || Instant::now() > deadline {
            if open > 0 {
                println!("{open} of {} flows not terminal {:?} after the final heal", all.len(), WAIT);
            }
            let mut out = Vec::with_capacity(all.len());
            for f in all {
                let flow = client.get_flow(&f.flow_type, &f.instance).await?;
                out.push(FinalFlow {
                    flow: format!("{}/{}", flow.flow_type, flow.instance),
                    status: flow.status.clone(),
                    error_kind: flow.error_kind.clone(),
                    error: flow.error.clone(),
                    input: flow.input_json.clone(),
                    messages: flow
                        .events
                        .iter()
                        .filter(|e| e.kind == "message")
                        .map(|e| (e.name.clone(), e.payload_json.clone()))
                        .collect(),
                    output: flow.output_json.clone(),
                    fired: flow
                        .events
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.kind == "timer_fired")
                        .map(|(i, e)| {
                            (e.name.clone(), flow.events[..i].iter().filter(|p| p.kind == "message").count())
                        })
                        .collect(),
                    child_results: flow
                        .events
                        .iter()
                        .filter(|e| e.kind == "child_finished")
                        .map(|e| e.name.clone())
                        .collect(),
                });
            }
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every node's digest of every shard, once each shard's replicas report the same applied
/// index, read while nothing was applied (or as they are after [`WAIT`]: the checker says so).
async fn digests(clients: &[(u64, Client)]) -> Result<Vec<DigestRecord>> {
    let mut out = Vec::new();
    for shard in 0..SHARDS {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut replicas = Vec::new();
            // Nodes outside the shard's placement hold no replica of it.
            let mut hosting = clients.len();
            for (node, client) in clients {
                match client.shard_digest(shard).await {
                    Ok(d) => replicas.push(DigestRecord {
                        shard,
                        node: *node,
                        applied_index: d.applied_index,
                        stable: d.stable,
                        rows: d.rows,
                        digest: d.digest,
                    }),
                    Err(e) if e.to_string().contains("holds no replica") => hosting -= 1,
                    Err(e) => println!("node {node}: no digest of shard {shard}: {e}"),
                }
            }
            let settled = replicas.len() == hosting
                && replicas.iter().all(|d| d.stable && d.applied_index == replicas[0].applied_index);
            if settled || Instant::now() > deadline {
                out.extend(replicas);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(out)
}

/// Runs one chaos run into `opts.out`; returns whether the checker passed.
pub async fn run(opts: RunOptions) -> Result<bool> {
    if opts.nodes == 0 || opts.nodes > 9 {
        bail!("--nodes must be 1 to 9");
    }
    if opts.partitions {
        net::setup()?;
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    println!(
        "chaos run: seed {}, {} nodes, {:?} of faults, partitions {}, into {}",
        opts.seed,
        opts.nodes,
        opts.duration,
        opts.partitions,
        out.display()
    );
    let about = serde_json::json!({
        "seed": opts.seed,
        "nodes": opts.nodes,
        "fault_seconds": opts.duration.as_secs(),
        "partitions": opts.partitions,
        "plant_bug": opts.plant_bug,
    });
    std::fs::write(out.join(history::RUN), about.to_string())?;
    let exe = std::env::current_exe().context("cannot find this program")?;
    let ledger = out.join(history::LEDGER);
    let _ = std::fs::remove_file(&ledger);
    let cluster_dir = out.join("cluster");
    let _ = std::fs::remove_dir_all(&cluster_dir);
    let mut local =
        LocalCluster::new(&exe, &cluster_dir, opts.nodes).shards(SHARDS).timing("relaxed").node_args(vec![
            "--ledger".into(),
            ledger.display().to_string(),
            "--service-latency-ms".into(),
            "20".into(),
            // A slow shipment: a fault often hits one in flight (its outcome becomes unknown).
            "--ship-latency-ms".into(),
            "100".into(),
        ]);
    if let Some(bug) = &opts.plant_bug {
        println!("planting bug {bug} in every node");
        local = local.env("FETTER_CHAOS_BUG", bug.clone());
    }
    if opts.partitions {
        local = local.own_addresses(true);
    } else {
        local = local.base_port(free_base_port(opts.nodes)?);
    }
    local.start_all().await.map_err(|e| anyhow!(e))?;
    let members = local.ids();
    let mut cluster = Cluster { local, partitions: opts.partitions, members, next_id: opts.nodes + 1 };
    if let Err(e) = cluster.local.wait_ready(WAIT).await {
        cluster.local.stop_all().await;
        bail!("the cluster did not get ready: {e}");
    }
    let result = drive(&mut cluster, &opts, &out).await;
    if !matches!(result, Ok(true)) {
        cluster.diagnose(&out).await;
    }
    cluster.local.stop_all().await;
    result
}

fn free_base_port(nodes: u64) -> Result<u16> {
    Ok(fetter::local::free_base_port(u16::try_from(nodes)?)?)
}

async fn drive(cluster: &mut Cluster, opts: &RunOptions, out: &Path) -> Result<bool> {
    let history_rec = Recorder::create(&out.join(history::HISTORY))?;
    let fault_rec = Recorder::create(&out.join(history::FAULTS))?;
    let profile = Profile {
        duration: opts.duration,
        nodes: opts.nodes,
        partitions: opts.partitions,
        replacements: opts.replacements,
    };
    let steps = schedule::plan(opts.seed, profile);
    // As an application would: each client knows every node and goes on to the next when one
    // does not answer; client `i` asks node `i` first (the history records that node). Every
    // client also knows the nodes that will replace lost ones (their ids and addresses follow
    // from the plan), as an application behind a load balancer would reach them: without them a
    // run whose every initial node is replaced leaves the workload with no node it can reach
    // (seed 107 did: 3 replacements in one `ci` run).
    let ids = cluster.local.ids();
    let successors: Vec<u64> = {
        let replacements =
            steps.iter().filter(|s| matches!(s.fault, schedule::Planned::Replace { .. })).count() as u64;
        (0..replacements).map(|k| cluster.next_id + k).collect()
    };
    let clients: Vec<(u64, Client)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let order = ids
                .iter()
                .cycle()
                .skip(i)
                .take(ids.len())
                .chain(successors.iter())
                .map(|n| cluster.local.addr(*n));
            Ok((*id, Client::connect(order)?.with_timeout(CALL)))
        })
        .collect::<Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(AtomicU64::new(1));
    let mut workers = tokio::task::JoinSet::new();
    for process in 0..WORKERS {
        workers.spawn(worker(
            process,
            opts.seed,
            clients.clone(),
            history_rec.clone(),
            ids.clone(),
            stop.clone(),
        ));
    }
    let started = Instant::now();
    let injected = faults(cluster, steps, fault_rec.clone(), stop.clone()).await;
    stop.store(true, Ordering::SeqCst);
    let mut ok_ops = 0;
    let mut owed = Vec::new();
    let mut acked = HashSet::new();
    while let Some(done) = workers.join_next().await {
        let (done, replies, rewards) = done??;
        ok_ops += done;
        owed.extend(replies);
        acked.extend(rewards);
    }
    let injected = injected?;
    history_rec.flush()?;
    fault_rec.flush()?;
    println!(
        "{injected} faults in {:.0} s; {ok_ops} operations acknowledged; healing",
        started.elapsed().as_secs_f64()
    );
    cluster.heal_all().await?;
    let owed_count = owed.len();
    let delivered = deliver_remaining(owed, acked, &clients, &history_rec, &ids).await?;
    history_rec.flush()?;
    println!("{delivered} of {owed_count} replies still owed delivered after the final heal");
    let placement_rec = Recorder::create(&out.join(history::PLACEMENT))?;
    for record in cluster.placement().await? {
        placement_rec.record(&record)?;
    }
    placement_rec.flush()?;
    let client = cluster.client()?;
    // Distinct flows: a start may be acknowledged more than once (retried, the same input).
    let starts: usize = history::read_lines::<OpRecord>(&out.join(history::HISTORY))?
        .iter()
        .filter(|r| r.phase == Phase::Ok && matches!(r.op, Op::Start { .. }))
        .map(|r| r.op.flow())
        .collect::<HashSet<String>>()
        .len();
    let finals = final_state(&client, starts).await?;
    let final_rec = Recorder::create(&out.join(history::FINAL))?;
    for f in &finals {
        final_rec.record(f)?;
    }
    final_rec.flush()?;
    // The digests are asked of each current member alone.
    let single: Vec<(u64, Client)> = cluster
        .members
        .iter()
        .map(|id| Ok((*id, Client::connect([cluster.local.addr(*id)])?.with_timeout(CALL))))
        .collect::<Result<_>>()?;
    let digest_rec = Recorder::create(&out.join(history::DIGESTS))?;
    for record in digests(&single).await? {
        digest_rec.record(&record)?;
    }
    digest_rec.flush()?;
    let report = crate::checker::check_dir(out, &crate::checker::CheckOptions::default())?;
    crate::report::write(out, opts.seed, &report)?;
    println!("{}", report.summary());
    Ok(report.passed())
}
