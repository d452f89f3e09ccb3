//! [`App`]: a fetter application binary — its flows plus the whole command line.
//!
//! ```text
//! <app> node --id 1 --listen 127.0.0.1:7001 --data-dir ./data/node-1 \
//!            --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003
//! <app> dev --nodes 3                      # a local 3-process cluster, in the foreground
//! <app> flow start|send|get|list|restart|cancel|succeed|fail|delete|effect-set|effect-remove …
//! <app> cluster status|add-node|remove-node …
//! <app> <the application's own commands>
//! ```
//!
//! Exit codes: 0 success, 1 error (message on stderr), 2 usage error.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, FromArgMatches, Parser, Subcommand};
use fetter_actors::Registry;
use fetter_raft::ids::NodeId;
use fetter_raft::node::Timing;

use crate::cli::{self, AddrArg, ClientCommand};
use crate::cluster::{ClusterNode, NodeOptions};
use crate::local::LocalCluster;

/// Builds the flows of a node from the application's node options.
pub type BuildRegistry<X> =
    Box<dyn Fn(&X, NodeId) -> Result<Registry, Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// Application-specific options of `node` (none).
#[derive(Args, Debug, Clone, Default)]
pub struct NoOptions {}

/// No application commands.
#[derive(Subcommand, Debug, Clone)]
pub enum NoCommands {}

/// A fetter application: `X` are its extra `node` options (e.g. where its fakes write).
pub struct App<X: Args + Clone = NoOptions> {
    name: &'static str,
    build: BuildRegistry<X>,
}

/// Raft timing profile.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default)]
pub enum TimingProfile {
    /// Heartbeat 100 ms, election 300–600 ms.
    #[default]
    Production,
    /// Heartbeat 200 ms, election 1–2 s (loaded test machines).
    Relaxed,
}

impl TimingProfile {
    fn timing(self) -> Timing {
        match self {
            TimingProfile::Production => Timing::production(),
            TimingProfile::Relaxed => Timing::relaxed(),
        }
    }
}

/// `node`: run one node of a cluster.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs<X: Args> {
    /// This node's id (a positive number, never reused after a node lost its disk).
    #[arg(long)]
    pub id: u64,
    /// Where to listen (the one gRPC port: API, forwarding, Raft).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The node's data directory (created if missing, reused on restart).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The initial members, this node included: `1=host:port,2=host:port,…`.
    #[arg(long, value_parser = parse_peers, conflicts_with = "join")]
    pub peers: Option<BTreeMap<NodeId, String>>,
    /// Join the cluster that `host:port` belongs to, instead of `--peers`.
    #[arg(long)]
    pub join: Option<String>,
    /// Shards (fixed when the cluster is created).
    #[arg(long, default_value_t = 12)]
    pub shards: u32,
    /// Raft timing.
    #[arg(long, value_enum, default_value_t)]
    pub timing: TimingProfile,
    /// Largest accepted user payload, in bytes: a cluster parameter, seeded by the node that
    /// creates the cluster (default 1 MiB); a node given another value than its cluster's is
    /// refused (`cluster config set` changes it).
    #[arg(long)]
    pub max_payload_bytes: Option<u64>,
    /// How long finished flows are kept, in seconds: a cluster parameter like
    /// `--max-payload-bytes` (default 7 days).
    #[arg(long)]
    pub retention_secs: Option<u64>,
    /// Replicas of each shard: a cluster parameter fixed when the cluster is created (default
    /// 3; a cluster of fewer nodes has fewer). With more nodes than replicas, each node holds
    /// and applies only its share of the shards.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: Option<u32>,
    /// This node's snapshot policy: a group snapshots its state after this many log entries
    /// and keeps a quarter of that (at most 1,000) for slow followers.
    #[arg(long, default_value_t = fetter_raft::node::DEFAULT_SNAPSHOT_AFTER_ENTRIES, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_after_entries: u64,
    /// The local address of the connections this node opens to other nodes (default: the
    /// system's choice). Several nodes on one host, each listening on its own address, give
    /// their own address here so that every node's traffic carries it.
    #[arg(long)]
    pub source_ip: Option<std::net::IpAddr>,
    /// The application's node options.
    #[command(flatten)]
    pub app: X,
}

/// `dev`: a local multi-process cluster in the foreground.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// The first node's port (node i listens on port + i - 1).
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Where the nodes keep their data (`<dir>/node-<i>`) and logs.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Shards.
    #[arg(long, default_value_t = 12)]
    pub shards: u32,
    /// Extra arguments for every node (after `--`), e.g. `-- --ledger ledger.jsonl`.
    #[arg(last = true)]
    pub node_args: Vec<String>,
}

#[derive(Parser, Debug)]
struct Cli<X: Args, E: Subcommand> {
    #[command(flatten)]
    addr: AddrArg,
    #[command(subcommand)]
    command: Command<X, E>,
}

#[derive(Subcommand, Debug)]
enum Command<X: Args, E: Subcommand> {
    /// Run one node of a cluster.
    Node(NodeArgs<X>),
    /// Run a local cluster of several node processes in the foreground (Ctrl-C stops all).
    Dev(DevArgs),
    #[command(flatten)]
    Client(ClientCommand),
    #[command(flatten)]
    App(E),
}

fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| format!("{part:?} is not id=host:port (in --peers {s:?})"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("{id:?} is not a node id (in --peers {s:?})"))?;
        if id == 0 {
            return Err("node ids start at 1".into());
        }
        let addr = addr.trim();
        if !crate::cluster::is_host_port(addr) {
            return Err(format!("{addr:?} is not host:port (in --peers {s:?})"));
        }
        if peers.insert(NodeId(id), addr.to_string()).is_some() {
            return Err(format!("node id {id} appears twice in --peers"));
        }
    }
    if peers.is_empty() {
        return Err("--peers is empty".into());
    }
    Ok(peers)
}

/// Sets up logging to stderr (`RUST_LOG`, default `info` for fetter, `warn` otherwise).
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).try_init();
}

impl App<NoOptions> {
    /// An application running `registry`'s flows.
    pub fn new(name: &'static str, registry: Registry) -> Self {
        App { name, build: Box::new(move |_, _| Ok(registry.clone())) }
    }
}

impl<X: Args + FromArgMatches + Clone + std::fmt::Debug + Send + Sync + 'static> App<X> {
    /// An application whose flows depend on its `node` options `X` (and the node's id).
    pub fn with_options(
        name: &'static str,
        build: impl Fn(&X, NodeId) -> Result<Registry, Box<dyn std::error::Error + Send + Sync>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        App { name, build: Box::new(build) }
    }

    /// Runs the command line with no application commands.
    pub fn run(self) -> ExitCode {
        self.run_with(|never: NoCommands| async move { match never {} })
    }

    /// Runs the command line; the application's own commands `E` go to `handle`.
    pub fn run_with<E, F, Fut>(self, handle: F) -> ExitCode
    where
        E: Subcommand + std::fmt::Debug,
        F: FnOnce(E) -> Fut,
        Fut: Future<Output = ExitCode>,
    {
        let cli = match Cli::<X, E>::try_parse() {
            Ok(cli) => cli,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
            }
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::from(1);
            }
        };
        runtime.block_on(async move {
            match cli.command {
                Command::Node(args) => {
                    init_tracing("info,openraft=warn,sled=warn");
                    self.node(args).await
                }
                Command::Dev(args) => {
                    init_tracing("warn");
                    dev(self.name, args).await
                }
                Command::Client(command) => match cli::run_client(command, &cli.addr.addr).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(e.exit_code())
                    }
                },
                Command::App(command) => handle(command).await,
            }
        })
    }

    async fn node(self, args: NodeArgs<X>) -> ExitCode {
        let registry = match (self.build)(&args.app, NodeId(args.id)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        let mut options = NodeOptions::new(args.id, args.listen, args.data_dir);
        options.peers = args.peers;
        options.join = args.join;
        options.shards = args.shards;
        options.timing = args.timing.timing();
        options.max_payload_bytes = args.max_payload_bytes;
        options.retention = args.retention_secs.map(Duration::from_secs);
        options.replicas = args.replicas;
        options.snapshot_after_entries = args.snapshot_after_entries;
        options.source_ip = args.source_ip;
        let node = match ClusterNode::start(options, registry).await {
            Ok(node) => node,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        println!("{} node {} serving on {}", self.name, args.id, node.addr());
        tokio::select! {
            _ = wait_for_stop_signal() => {}
            _ = crate::local::parent_gone() => tracing::warn!("the process that started this node is gone"),
        }
        tracing::info!(node = args.id, "stopping");
        node.shutdown_gracefully().await;
        ExitCode::SUCCESS
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn dev(name: &str, args: DevArgs) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this program's path: {e}");
            return ExitCode::from(1);
        }
    };
    let mut cluster = LocalCluster::new(exe, args.data_dir, args.nodes)
        .base_port(args.base_port)
        .shards(args.shards)
        .node_args(args.node_args);
    if let Err(e) = cluster.start_all().await {
        eprintln!("error: {e}");
        cluster.stop_all().await;
        return ExitCode::from(1);
    }
    println!(
        "{name}: {} nodes on {} (data and logs in {}); Ctrl-C stops them all",
        args.nodes,
        cluster.addrs().join(", "),
        cluster.data_dir().display()
    );
    match cluster.wait_ready(Duration::from_secs(60)).await {
        Ok(()) => println!("cluster ready: try `{name} cluster status`"),
        Err(e) => eprintln!("warning: {e}"),
    }
    wait_for_stop_signal().await;
    println!("stopping…");
    cluster.stop_all().await;
    ExitCode::SUCCESS
}
