//! [`LocalCluster`]: node processes of one application binary on this machine — what `dev`, the
//! demo, the benchmark and the multi-process tests run.
//!
//! Node `i` listens on `127.0.0.1:<base_port + i - 1>`, keeps its data in `<dir>/node-<i>` and
//! appends its output to `<dir>/node-<i>.log`. Nodes are started with
//! `FETTER_EXIT_WITH_PARENT=1`, so they stop when the process that started them dies, however
//! it dies; dropping a `LocalCluster` kills its nodes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::client::Client;

/// The first port of `n` consecutive loopback ports that are free now, chosen below the kernel's
/// range of ephemeral ports (`/proc/sys/net/ipv4/ip_local_port_range`, from 32768 if unreadable):
/// a port in that range can be taken by any process's outgoing connection between this check and
/// the node binding it, as tests running in parallel showed ("Address already in use").
pub fn free_base_port(n: u16) -> std::io::Result<u16> {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    const LOWEST: u16 = 10_000;
    let top = ephemeral_from.saturating_sub(n).max(LOWEST + 1);
    // Start somewhere different in each process and call, then walk the range.
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    let span = u64::from(top - LOWEST);
    for step in 0..span {
        let base = LOWEST + ((seed + step * 7_919) % span) as u16;
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no {n} consecutive free ports below {ephemeral_from}"),
    ))
}

/// Signals sent to node processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `kill -9`.
    Kill,
    /// Graceful stop.
    Term,
    /// Freeze.
    Stop,
    /// Thaw.
    Cont,
}

impl Signal {
    fn flag(self) -> &'static str {
        match self {
            Signal::Kill => "-KILL",
            Signal::Term => "-TERM",
            Signal::Stop => "-STOP",
            Signal::Cont => "-CONT",
        }
    }
}

/// Sends `signal` to process `pid` (through `kill(1)`: this crate has no unsafe code).
pub fn send_signal(pid: u32, signal: Signal) -> Result<(), String> {
    let status = std::process::Command::new("kill")
        .arg(signal.flag())
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {} {pid} failed", signal.flag()))
    }
}

/// A set of local node processes.
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    nodes: u64,
    base_port: u16,
    shards: u32,
    timing: Option<String>,
    node_args: Vec<String>,
    own_addresses: bool,
    envs: Vec<(String, String)>,
    children: BTreeMap<u64, Child>,
    /// The arguments each node was last started with.
    last_args: BTreeMap<u64, Vec<String>>,
}

impl LocalCluster {
    /// `nodes` nodes of the program `exe` (its `node` command) with data under `dir`.
    pub fn new(exe: impl Into<PathBuf>, dir: impl Into<PathBuf>, nodes: u64) -> Self {
        LocalCluster {
            exe: exe.into(),
            dir: dir.into(),
            nodes,
            base_port: 7001,
            shards: 12,
            timing: None,
            node_args: Vec::new(),
            own_addresses: false,
            envs: Vec::new(),
            children: BTreeMap::new(),
            last_args: BTreeMap::new(),
        }
    }

    /// The first node's port.
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = port;
        self
    }

    /// Shards.
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }

    /// Raft timing profile (`production` or `relaxed`).
    pub fn timing(mut self, profile: &str) -> Self {
        self.timing = Some(profile.to_string());
        self
    }

    /// Extra arguments for every node's `node` command.
    pub fn node_args(mut self, args: Vec<String>) -> Self {
        self.node_args = args;
        self
    }

    /// Each node on its own loopback address: node `i` listens on `127.0.1.i` (all on the base
    /// port) and opens its connections from there (`--source-ip`), so that rules on addresses
    /// can cut the network between nodes. Linux routes all of `127.0.0.0/8` to loopback.
    pub fn own_addresses(mut self, own: bool) -> Self {
        self.own_addresses = own;
        self
    }

    /// An environment variable for every node process.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Node `id`'s IP address.
    pub fn ip(&self, id: u64) -> String {
        if self.own_addresses {
            format!("127.0.1.{id}")
        } else {
            "127.0.0.1".to_string()
        }
    }

    /// Where the nodes keep data and logs.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The ids of the nodes of the initial member list.
    pub fn ids(&self) -> Vec<u64> {
        (1..=self.nodes).collect()
    }

    /// Node `id`'s address.
    pub fn addr(&self, id: u64) -> String {
        if self.own_addresses {
            format!("{}:{}", self.ip(id), self.base_port)
        } else {
            format!("127.0.0.1:{}", u64::from(self.base_port) + id - 1)
        }
    }

    /// Every initial node's address.
    pub fn addrs(&self) -> Vec<String> {
        self.ids().into_iter().map(|id| self.addr(id)).collect()
    }

    /// The `--peers` argument.
    pub fn peers_arg(&self) -> String {
        self.ids().into_iter().map(|id| format!("{id}={}", self.addr(id))).collect::<Vec<_>>().join(",")
    }

    /// Node `id`'s data directory.
    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// Node `id`'s log file.
    pub fn log_file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    /// The `node` command's arguments for an initial member.
    pub fn node_command(&self, id: u64) -> Vec<String> {
        let mut args = vec![
            "node".to_string(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            self.addr(id),
            "--data-dir".into(),
            self.node_dir(id).display().to_string(),
            "--peers".into(),
            self.peers_arg(),
            "--shards".into(),
            self.shards.to_string(),
        ];
        if let Some(t) = &self.timing {
            args.extend(["--timing".to_string(), t.clone()]);
        }
        if self.own_addresses {
            args.extend(["--source-ip".to_string(), self.ip(id)]);
        }
        args.extend(self.node_args.iter().cloned());
        args
    }

    /// The `node` command's arguments for a node that joins the cluster through `join` (a
    /// member's address) instead of being an initial member.
    pub fn join_command(&self, id: u64, join: &str) -> Vec<String> {
        let mut args = self.node_command(id);
        if let Some(at) = args.iter().position(|a| a == "--peers") {
            args[at] = "--join".into();
            args[at + 1] = join.to_string();
        }
        // A joining node learns the shard count from the cluster.
        if let Some(at) = args.iter().position(|a| a == "--shards") {
            args.drain(at..at + 2);
        }
        args
    }

    /// Starts node `id` again with the arguments it was last started with (an initial
    /// member's usual ones if it never ran).
    pub async fn restart(&mut self, id: u64) -> Result<(), String> {
        let args = self.last_args.get(&id).cloned().unwrap_or_else(|| self.node_command(id));
        self.spawn(id, args)
    }

    /// Starts node `id` (an initial member) with its usual arguments.
    pub async fn start(&mut self, id: u64) -> Result<(), String> {
        let args = self.node_command(id);
        self.spawn(id, args)
    }

    /// Starts node `id` with `args` (the `node` command and its options).
    pub fn spawn(&mut self, id: u64, args: Vec<String>) -> Result<(), String> {
        if let Some(child) = self.children.get_mut(&id) {
            if matches!(child.try_wait(), Ok(None)) {
                return Err(format!("node {id} is already running"));
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(id))
            .map_err(|e| format!("opening {}: {e}", self.log_file(id).display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        self.last_args.insert(id, args.clone());
        let child = Command::new(&self.exe)
            .args(&args)
            .env("FETTER_EXIT_WITH_PARENT", "1")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        self.children.insert(id, child);
        Ok(())
    }

    /// Starts every initial node.
    pub async fn start_all(&mut self) -> Result<(), String> {
        for id in self.ids() {
            self.start(id).await?;
        }
        Ok(())
    }

    /// Node `id`'s process id, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children.get(&id).and_then(|c| c.id())
    }

    /// Whether node `id`'s process is running (not exited).
    pub fn is_running(&mut self, id: u64) -> bool {
        self.children.get_mut(&id).is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` to node `id`.
    pub fn signal(&self, id: u64, signal: Signal) -> Result<(), String> {
        let pid = self.pid(id).ok_or_else(|| format!("node {id} is not running"))?;
        send_signal(pid, signal)
    }

    /// `kill -9`s node `id` and reaps it.
    pub async fn kill(&mut self, id: u64) -> Result<(), String> {
        let mut child = self.children.remove(&id).ok_or_else(|| format!("node {id} is not running"))?;
        child.kill().await.map_err(|e| format!("killing node {id}: {e}"))
    }

    /// SIGTERMs node `id` and waits up to `timeout` for it to exit (then kills it); returns
    /// whether it exited by itself, and its exit code.
    pub async fn terminate(&mut self, id: u64, timeout: Duration) -> Result<(bool, Option<i32>), String> {
        let mut child = self.children.remove(&id).ok_or_else(|| format!("node {id} is not running"))?;
        if let Some(pid) = child.id() {
            send_signal(pid, Signal::Term)?;
        }
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => Ok((true, status.code())),
            Ok(Err(e)) => Err(format!("waiting for node {id}: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                Ok((false, None))
            }
        }
    }

    /// Waits for node `id` to exit by itself, up to `timeout`; returns its exit code.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> Result<Option<i32>, String> {
        let child = self.children.get_mut(&id).ok_or_else(|| format!("node {id} is not running"))?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .map_err(|_| format!("node {id} did not exit within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        self.children.remove(&id);
        Ok(status.code())
    }

    /// A client of every initial node.
    pub fn client(&self) -> Result<Client, String> {
        Client::connect(self.addrs()).map_err(|e| e.to_string())
    }

    /// Waits until the cluster reports every running node alive and every shard with a leader.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let client = self.client()?;
        let running: Vec<u64> = self.ids().into_iter().filter(|id| self.is_running(*id)).collect();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: String;
        loop {
            match client.cluster_status().await {
                Ok(status) => {
                    let alive =
                        running.iter().all(|id| status.members.iter().any(|m| m.id == *id && m.alive));
                    let led = !status.shards.is_empty() && status.shards.iter().all(|s| s.leader.is_some());
                    if alive && led {
                        return Ok(());
                    }
                    last = format!("members {:?}, shards led: {led}", status.members);
                }
                Err(e) => last = e.to_string(),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("the cluster was not ready within {timeout:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every node: SIGTERM, then SIGKILL after 10 s.
    pub async fn stop_all(&mut self) {
        let ids: Vec<u64> = self.children.keys().copied().collect();
        for id in &ids {
            let _ = self.signal(*id, Signal::Cont);
            let _ = self.signal(*id, Signal::Term);
        }
        for id in ids {
            if let Some(mut child) = self.children.remove(&id) {
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.start_kill();
        }
    }
}

/// In a node started by a [`LocalCluster`]: resolves when the parent process is gone.
pub async fn parent_gone() {
    if std::env::var_os("FETTER_EXIT_WITH_PARENT").is_none() {
        return std::future::pending().await;
    }
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}
