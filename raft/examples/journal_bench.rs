//! # journal_bench — commit throughput and latency of the replicated journal
//!
//! Measures how many shard commands per second the journal commits, how many fsyncs that costs
//! and how long one commit takes, end to end through the real stack: group commit in
//! `GroupHandle`, openraft, the sled log with its shared flusher, the tonic transport between
//! separate processes over loopback, and the real shard `apply`.
//!
//! ```text
//! cargo run --release -p fetter-raft --example journal_bench -- --nodes 3 --proposers 64 --seconds 10
//! ```
//!
//! Layout (the production one): 12 shard groups plus group 0, every node a voter of every group.
//! The binary has two roles. Run without `--role` it is the *coordinator*: it makes a temporary
//! directory, picks free loopback ports and starts `--nodes` child processes of itself with
//! `--role node`. Node 1 initializes every group with all nodes as members, so it becomes the
//! leader of every group, and it runs the load: the proposers live in node 1's process (no
//! client hop is measured), while nodes 2..N are real follower processes that receive, fsync and
//! acknowledge every entry over tonic before it can commit.
//!
//! Before measuring, node 1 commits `Configure` to every shard, then starts `--flows-per-shard`
//! flows on each shard and activates them (epoch 1). Then `--proposers` tasks propose for
//! `--warmup-seconds` (not measured) plus `--seconds` (measured). Each task walks the shards
//! round-robin and alternates `EffectCompleted` (a new effect id every time) and `AppendEvent`
//! (a `Message` event), each carrying a JSON payload of `--payload-bytes` (≈ 200-byte
//! commands). Every command is expected to succeed; rejections and errors are counted.
//!
//! Reported: commits/s (commands whose reply arrived inside the measured window), fsyncs/s of
//! node 1 (the leader of every group; each follower does its own, similar number), Raft log
//! entries per second and commands per entry (group commit), and p50/p99/max latency from
//! `propose_shard` to its reply. The last line of stdout is one JSON object:
//!
//! ```text
//! {"nodes":3,"proposers":64,"commits_per_s":…,"fsyncs_per_s":…,"rejected":0,"errors":0,"p50_ms":…,"p99_ms":…,"max_ms":…}
//! ```
//!
//! Logs go to stderr (`RUST_LOG`; default `warn,openraft=error`, which hides the benign vote
//! warnings of the start-up elections).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use fetter_raft::handle::GroupHandle;
use fetter_raft::ids::{ClusterId, Epoch, FlowId, GroupId, NodeId, ShardId};
use fetter_raft::node::{NodeConfig, RaftNode, Timing};
use fetter_raft::placement::shard_of;
use fetter_raft::shard::{EffectKind, Event, ShardCommand, ShardOutcome};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

// The node processes allocate many small, short-lived buffers (sled nodes, codec records,
// tonic frames); glibc's malloc spent ~20 % of the CPU on them. A node binary picks its
// allocator; the bench uses mimalloc, as fetter's node binary will.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shard groups of the production layout (groups 1..=12; group 0 is the metadata group).
const SHARD_COUNT: u32 = 12;
/// The cluster id every node of the bench shares.
const CLUSTER_ID: &str = "bench";
/// The flow type of every bench flow.
const FLOW_TYPE: &str = "bench";
/// Bound on waiting for a follower process to listen.
const NODE_START_WAIT: Duration = Duration::from_secs(20);
/// Bound on waiting for node 1 to lead every group.
const LEADERSHIP_WAIT: Duration = Duration::from_secs(20);
/// How many rejections / errors are printed to stderr (all are counted).
const PRINT_LIMIT: usize = 5;
/// Highest latency the histograms track (µs); larger values are clamped to it.
const MAX_LATENCY_US: u64 = 60_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Start the node processes and relay node 1's report.
    Coordinator,
    /// One node of the cluster (started by the coordinator).
    Node,
}

/// Journal commit benchmark: separate node processes, tonic over loopback, real shard apply.
#[derive(Debug, Clone, Parser)]
#[command(name = "journal_bench")]
struct Args {
    /// Number of nodes (separate processes); every node is a voter of every group.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Concurrent proposing tasks (each has one proposal outstanding at a time).
    #[arg(long, default_value_t = 64)]
    proposers: usize,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured load before the window, in seconds.
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// Flows started (and activated) per shard before the load.
    #[arg(long, default_value_t = 64)]
    flows_per_shard: usize,
    /// Size of each command's JSON payload, in bytes.
    #[arg(long, default_value_t = 150)]
    payload_bytes: usize,

    /// Internal: the process's role.
    #[arg(long, value_enum, default_value_t = Role::Coordinator, hide = true)]
    role: Role,
    /// Internal: this node's id.
    #[arg(long, hide = true)]
    id: Option<u64>,
    /// Internal: this node's Raft port on 127.0.0.1.
    #[arg(long, hide = true)]
    port: Option<u16>,
    /// Internal: this node's data directory.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
    /// Internal: every node as `id=host:port`, comma-separated.
    #[arg(long, hide = true)]
    peers: Option<String>,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error")),
        )
        .init();
    let result = match args.role {
        Role::Coordinator => coordinator(&args),
        Role::Node => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot build the tokio runtime")
            .and_then(|rt| rt.block_on(node_main(&args))),
    };
    // Exit explicitly: a node's runtime still has Raft tasks and the flusher thread running,
    // and there is nothing to clean up that the coordinator does not remove.
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("journal_bench ({:?}): error: {e:#}", args.role);
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------------------------

/// Child processes that are killed (and reaped) when this is dropped, on success or error.
#[derive(Default)]
struct Children(Vec<(u64, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn coordinator(args: &Args) -> Result<()> {
    if args.nodes == 0 || args.proposers == 0 || args.seconds == 0 || args.flows_per_shard == 0 {
        bail!("--nodes, --proposers, --seconds and --flows-per-shard must be positive");
    }
    // Declared before `children` so that it is dropped after they are killed.
    let tmp = tempfile::Builder::new().prefix("journal_bench").tempdir().context("cannot create temp dir")?;
    let ports = free_ports(args.nodes)?;
    let peers = ports.iter().map(|(id, port)| format!("{id}=127.0.0.1:{port}")).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut children = Children::default();

    // Followers first, each waited for until it listens, so that node 1's elections find them.
    for (&id, &port) in ports.iter().filter(|(id, _)| **id != 1) {
        let mut child = spawn_node(&exe, args, id, port, &tmp.path().join(format!("n{id}")), &peers)?;
        let stdout = child.stdout.take().context("child stdout not piped")?;
        children.0.push((id, child));
        // The follower's first line says it listens; anything after that goes to our stderr, so
        // that our stdout ends with the JSON line.
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first_tx.send(lines.next());
            for line in lines.map_while(Result::ok) {
                eprintln!("[n{id}] {line}");
            }
        });
        match first_rx.recv_timeout(NODE_START_WAIT) {
            Ok(Some(Ok(line))) if line == "ready" => {}
            Ok(Some(Ok(line))) => bail!("node {id} said {line:?} instead of \"ready\""),
            Ok(Some(Err(e))) => bail!("cannot read node {id}'s output: {e}"),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                bail!("node {id} exited before it was ready (see its stderr above)")
            }
            Err(RecvTimeoutError::Timeout) => bail!("node {id} not ready within {NODE_START_WAIT:?}"),
        }
    }

    let port1 = ports.get(&1).copied().context("node 1 has no port")?;
    let mut leader = spawn_node(&exe, args, 1, port1, &tmp.path().join("n1"), &peers)?;
    let stdout = leader.stdout.take().context("child stdout not piped")?;
    children.0.push((1, leader));

    // Relay node 1's report; its last line is the JSON line, and nothing is printed after it.
    let mut last = None;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read node 1's output")?;
        writeln!(out, "{line}")?;
        out.flush()?;
        last = Some(line);
    }
    let status = match children.0.last_mut() {
        Some((_, child)) => child.wait().context("cannot wait for node 1")?,
        None => bail!("node 1 was not started"),
    };
    if !status.success() {
        bail!("node 1 failed ({status}); see its stderr above");
    }
    match last {
        Some(line) if line.starts_with('{') => Ok(()),
        _ => Err(anyhow!("node 1 exited without printing the JSON result")),
    }
}

/// One free loopback port per node: bind port 0, read the port, release it (all at the end, so
/// that the kernel cannot hand the same port out twice).
fn free_ports(nodes: u64) -> Result<BTreeMap<u64, u16>> {
    let mut listeners = Vec::new();
    let mut ports = BTreeMap::new();
    for id in 1..=nodes {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
        ports.insert(id, listener.local_addr()?.port());
        listeners.push(listener);
    }
    drop(listeners);
    Ok(ports)
}

/// Starts node `id` as a child process of this executable. Its stdin is a pipe that is never
/// written: when this process dies, the pipe closes and the node exits (see `exit_when_orphaned`).
fn spawn_node(
    exe: &std::path::Path,
    args: &Args,
    id: u64,
    port: u16,
    dir: &std::path::Path,
    peers: &str,
) -> Result<Child> {
    let child = Command::new(exe)
        .arg("--role=node")
        .arg(format!("--id={id}"))
        .arg(format!("--port={port}"))
        .arg("--dir")
        .arg(dir)
        .arg(format!("--peers={peers}"))
        .arg(format!("--nodes={}", args.nodes))
        .arg(format!("--proposers={}", args.proposers))
        .arg(format!("--seconds={}", args.seconds))
        .arg(format!("--warmup-seconds={}", args.warmup_seconds))
        .arg(format!("--flows-per-shard={}", args.flows_per_shard))
        .arg(format!("--payload-bytes={}", args.payload_bytes))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start node {id}"))?;
    Ok(child)
}

// ---------------------------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------------------------

async fn node_main(args: &Args) -> Result<()> {
    let id = NodeId(args.id.context("--id is required with --role node")?);
    let port = args.port.context("--port is required with --role node")?;
    let dir = args.dir.clone().context("--dir is required with --role node")?;
    let members = parse_peers(args.peers.as_deref().context("--peers is required with --role node")?)?;
    exit_when_orphaned();

    let mut config =
        NodeConfig::new(id, SocketAddr::from(([127, 0, 0, 1], port)), dir, ClusterId(CLUSTER_ID.to_string()));
    config.timing = Timing::production();
    // No snapshot during a run: building one is not what this bench measures.
    config.snapshot_after_entries = 1 << 40;
    let node = RaftNode::start(config).await.with_context(|| format!("cannot start node {id}"))?;
    let mut groups = vec![node.open_group(GroupId::META).await?];
    for s in 0..SHARD_COUNT {
        groups.push(node.open_group(GroupId::of_shard(ShardId(s))).await?);
    }

    if id != NodeId(1) {
        // A follower: replicate until the coordinator kills us or goes away.
        println!("ready");
        std::io::stdout().flush()?;
        std::future::pending::<()>().await;
    }
    lead_and_load(args, &node, &groups, members).await
}

/// Exits the process when stdin reaches end of file, i.e. when the coordinator is gone.
fn exit_when_orphaned() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

/// Parses `1=127.0.0.1:4001,2=127.0.0.1:4002`.
fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>> {
    s.split(',')
        .map(|part| {
            let (id, addr) = part.split_once('=').with_context(|| format!("bad peer {part:?}"))?;
            Ok((NodeId(id.parse().with_context(|| format!("bad peer id in {part:?}"))?), addr.to_string()))
        })
        .collect()
}

/// Node 1: make it the leader of every group, prepare the flows, run the load and report.
async fn lead_and_load(
    args: &Args,
    node: &Arc<RaftNode>,
    groups: &[GroupHandle],
    members: BTreeMap<NodeId, String>,
) -> Result<()> {
    for g in groups {
        g.initialize(members.clone()).await.with_context(|| format!("cannot initialize {}", g.group()))?;
    }
    let mut waits = JoinSet::new();
    for g in groups {
        waits.spawn(await_leadership(g.clone()));
    }
    while let Some(r) = waits.join_next().await {
        r??;
    }
    let shards: Vec<GroupHandle> = groups.iter().filter(|g| g.group() != GroupId::META).cloned().collect();

    let flows = bench_flows(args.flows_per_shard);
    let setup = prepare(&shards, &flows).await?;

    // The load.
    let plan = Arc::new(Plan {
        shards,
        flows,
        payload_bytes: args.payload_bytes,
        padding: "x".repeat(args.payload_bytes),
        printed: AtomicUsize::new(0),
    });
    let start = Instant::now();
    let window_start = start + Duration::from_secs(args.warmup_seconds);
    let window_end = window_start + Duration::from_secs(args.seconds);
    let mut tasks = JoinSet::new();
    for t in 0..args.proposers {
        tasks.spawn(proposer(plan.clone(), t, args.proposers, window_start, window_end));
    }
    tokio::time::sleep_until(window_start).await;
    let fsyncs_before = node.store().fsyncs();
    let entries_before = applied_entries(&plan.shards);
    tokio::time::sleep_until(window_end).await;
    let fsyncs_after = node.store().fsyncs();
    let entries_after = applied_entries(&plan.shards);
    let window = window_end.saturating_duration_since(window_start).as_secs_f64();

    let mut total = Tally::new()?;
    while let Some(r) = tasks.join_next().await {
        total.merge(r??)?;
    }

    let fsyncs = fsyncs_after.saturating_sub(fsyncs_before);
    let entries = entries_after.saturating_sub(entries_before);
    let h = &total.latency_us;
    let ms = |us: u64| us as f64 / 1000.0;
    let (p50, p99, max) = (ms(h.value_at_quantile(0.50)), ms(h.value_at_quantile(0.99)), ms(h.max()));
    let commits_per_s = total.commits as f64 / window;
    let fsyncs_per_s = fsyncs as f64 / window;
    let per = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };

    println!(
        "journal_bench: {} node(s) as separate processes (tonic over loopback), {} shard groups + group 0",
        args.nodes, SHARD_COUNT
    );
    println!("  leader of every group: node 1, which also runs the {} proposers", args.proposers);
    println!(
        "  setup: {} flows ({} per shard) started and activated, {} setup command(s) rejected",
        args.flows_per_shard * SHARD_COUNT as usize,
        args.flows_per_shard,
        setup.rejected
    );
    println!(
        "  load: EffectCompleted / AppendEvent alternating, {}-byte JSON payloads; {} s warm-up, {} s measured",
        args.payload_bytes, args.warmup_seconds, args.seconds
    );
    println!("  commits:   {:>10} ({commits_per_s:.0}/s)", total.commits);
    println!("  rejected:  {:>10}", total.rejected);
    println!("  errors:    {:>10}", total.errors);
    println!(
        "  fsyncs:    {fsyncs:>10} ({fsyncs_per_s:.0}/s on node 1, the leader; {:.1} commits per fsync)",
        per(total.commits, fsyncs)
    );
    println!(
        "  entries:   {entries:>10} ({:.0}/s over the shard groups; {:.1} commands per entry)",
        entries as f64 / window,
        per(total.commits + total.rejected, entries)
    );
    println!("  latency:   p50 {p50:.3} ms, p99 {p99:.3} ms, max {max:.3} ms");
    // Written by hand: the fields in this order (serde_json's map would sort them).
    let json = format!(
        concat!(
            r#"{{"nodes":{},"proposers":{},"commits_per_s":{:.1},"fsyncs_per_s":{:.1},"#,
            r#""rejected":{},"errors":{},"p50_ms":{},"p99_ms":{},"max_ms":{}}}"#
        ),
        args.nodes, args.proposers, commits_per_s, fsyncs_per_s, total.rejected, total.errors, p50, p99, max
    );
    println!("{json}");
    std::io::stdout().flush()?;
    Ok(())
}

/// Waits until this node leads `group`. If another node won an election, asks for a new one
/// (node 1 must lead every group so that the proposers, which run here, need no forwarding).
async fn await_leadership(group: GroupHandle) -> Result<()> {
    let deadline = Instant::now() + LEADERSHIP_WAIT;
    let mut status = group.status();
    let mut next_nudge = Instant::now() + Duration::from_secs(1);
    loop {
        let (is_leader, leader) = {
            let s = status.borrow_and_update();
            (s.is_leader, s.leader)
        };
        if is_leader {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "node 1 did not become leader of {} within {LEADERSHIP_WAIT:?} (leader: {leader:?})",
                group.group()
            );
        }
        if leader.is_some() && now >= next_nudge {
            group.raft().trigger().elect().await.map_err(|e| anyhow!("cannot trigger an election: {e}"))?;
            next_nudge = now + Duration::from_secs(1);
        }
        // Woken by a status change, or re-checked every 100 ms.
        let _ = tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
    }
}

/// `per_shard` flow ids for each shard: ids are generated in order and each is kept by the shard
/// it hashes to until that shard has enough.
fn bench_flows(per_shard: usize) -> Vec<Vec<FlowId>> {
    let mut flows = vec![Vec::with_capacity(per_shard); SHARD_COUNT as usize];
    let mut n = 0u64;
    while flows.iter().any(|f| f.len() < per_shard) {
        let flow = FlowId::new(FLOW_TYPE, format!("f-{n}"));
        n += 1;
        let bucket = &mut flows[shard_of(&flow, SHARD_COUNT).0 as usize];
        if bucket.len() < per_shard {
            bucket.push(flow);
        }
    }
    flows
}

struct Setup {
    rejected: u64,
}

/// Configures every shard, then starts and activates (epoch 1) its flows, shards in parallel.
/// A rejection is reported and counted (the measured commands on that flow will then fail too);
/// an error (timeout, lost leadership) aborts the run.
async fn prepare(shards: &[GroupHandle], flows: &[Vec<FlowId>]) -> Result<Setup> {
    let printed = Arc::new(AtomicUsize::new(0));
    let mut shard_tasks = JoinSet::new();
    for (s, (group, flows)) in shards.iter().zip(flows).enumerate() {
        let (group, flows, printed) = (group.clone(), flows.clone(), printed.clone());
        shard_tasks.spawn(async move {
            let mut rejected = 0u64;
            let mut check = |what: String, reply: Result<ShardOutcome, fetter_raft::shard::Rejection>| {
                if let Err(r) = reply {
                    rejected += 1;
                    if printed.fetch_add(1, Ordering::Relaxed) < PRINT_LIMIT {
                        eprintln!("journal_bench: setup {what} rejected: {r}");
                    }
                }
            };
            let configure = ShardCommand::Configure { shard_id: ShardId(s as u32), shard_count: SHARD_COUNT };
            check(format!("Configure of {}", group.group()), group.propose_shard(configure).await?);
            let input = br#"{"bench":true}"#.to_vec();
            let starts = flows.iter().map(|flow| {
                group.propose_shard(ShardCommand::Start {
                    flow: flow.clone(),
                    input: input.clone(),
                    parent: None,
                })
            });
            for (flow, reply) in flows.iter().zip(futures::future::join_all(starts).await) {
                check(format!("Start of {flow}"), reply?);
            }
            let activations = flows.iter().map(|flow| {
                group.propose_shard(ShardCommand::Activate { flow: flow.clone(), epoch: Epoch(1) })
            });
            for (flow, reply) in flows.iter().zip(futures::future::join_all(activations).await) {
                check(format!("Activate of {flow}"), reply?);
            }
            anyhow::Ok(rejected)
        });
    }
    let mut rejected = 0;
    while let Some(r) = shard_tasks.join_next().await {
        rejected += r?.context("setup failed")?;
    }
    Ok(Setup { rejected })
}

/// What the proposers share.
struct Plan {
    shards: Vec<GroupHandle>,
    flows: Vec<Vec<FlowId>>,
    payload_bytes: usize,
    padding: String,
    /// Rejections and errors printed so far (across tasks).
    printed: AtomicUsize,
}

impl Plan {
    /// A JSON payload of `payload_bytes` bytes (or a little more if the numbers are long).
    fn payload(&self, task: usize, seq: u64) -> Vec<u8> {
        let head = format!(r#"{{"task":{task},"seq":{seq},"pad":""#);
        let pad = self.payload_bytes.saturating_sub(head.len() + 2);
        let mut out = String::with_capacity(head.len() + pad + 2);
        out.push_str(&head);
        out.push_str(&self.padding[..pad]);
        out.push_str("\"}");
        out.into_bytes()
    }

    fn print_once(&self, message: impl FnOnce() -> String) {
        if self.printed.fetch_add(1, Ordering::Relaxed) < PRINT_LIMIT {
            eprintln!("journal_bench: {}", message());
        }
    }
}

/// What one proposer saw inside the measured window.
struct Tally {
    commits: u64,
    rejected: u64,
    errors: u64,
    latency_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Result<Tally> {
        Ok(Tally {
            commits: 0,
            rejected: 0,
            errors: 0,
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
        })
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.commits += other.commits;
        self.rejected += other.rejected;
        self.errors += other.errors;
        self.latency_us.add(other.latency_us)?;
        Ok(())
    }
}

/// One proposer: one command outstanding at a time until `end`. Step `i` of task `t` goes to
/// shard `(t + i) mod 12`, so each task cycles through every shard; the flow within the shard
/// rotates with the task and the cycle. Even steps record an effect value, odd steps append an
/// event. Replies that arrive inside `[start, end)` are counted, and the latency of every
/// committed one (accepted or rejected) recorded.
async fn proposer(plan: Arc<Plan>, task: usize, tasks: usize, start: Instant, end: Instant) -> Result<Tally> {
    let mut tally = Tally::new()?;
    let shard_count = plan.shards.len();
    let mut step = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let shard = (task + step as usize) % shard_count;
        let cycle = (task + step as usize) / shard_count;
        let flows = &plan.flows[shard];
        let flow = flows[(task + cycle * tasks) % flows.len()].clone();
        let command = if step.is_multiple_of(2) {
            ShardCommand::EffectCompleted {
                flow,
                epoch: Epoch(1),
                effect_id: format!("e-{task}-{step}"),
                kind: EffectKind::Effect,
                type_name: "BenchValue".to_string(),
                value: plan.payload(task, step),
            }
        } else {
            ShardCommand::AppendEvent {
                flow,
                event: Event::Message {
                    type_name: "BenchEvent".to_string(),
                    payload: plan.payload(task, step),
                    idempotency_key: None,
                },
            }
        };
        let reply = plan.shards[shard].propose_shard(command).await;
        let done = Instant::now();
        step += 1;
        if done < start || done >= end {
            continue;
        }
        // A rejected command was committed too: its latency counts like any other.
        if reply.is_ok() {
            tally.latency_us.saturating_record(done.duration_since(sent).as_micros() as u64);
        }
        match reply {
            Ok(Ok(_)) => tally.commits += 1,
            Ok(Err(rejection)) => {
                tally.rejected += 1;
                plan.print_once(|| format!("rejected on {}: {rejection}", plan.shards[shard].group()));
            }
            Err(e) => {
                tally.errors += 1;
                plan.print_once(|| format!("error: {e}"));
            }
        }
    }
    Ok(tally)
}

/// Entries applied so far, summed over the shard groups (as node 1 sees them).
fn applied_entries(shards: &[GroupHandle]) -> u64 {
    shards.iter().map(|g| g.status().borrow().last_applied.unwrap_or(0)).sum()
}
