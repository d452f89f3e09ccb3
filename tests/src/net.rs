//! Network faults made by the kernel: a harness (the chaos runner, or one test) runs in a
//! private network namespace of its own (`unshare --net`), where every node has its own loopback
//! address (`127.0.1.N`) and sends from it, and nftables rules in that namespace drop the
//! traffic between chosen addresses. The namespace, its rules and every process in it go away
//! with the harness, whatever way it ends.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Set in the environment of the harness once it runs inside its own namespace.
pub const IN_NAMESPACE: &str = "FETTER_NETNS";

/// The nftables table of the harness.
const TABLE: &str = "fetter_net";

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether this process runs as root (network namespaces and nftables need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
            .unwrap_or(false)
    })
}

/// Whether this process runs inside a namespace made by [`reexec_in_namespace`].
pub fn in_namespace() -> bool {
    std::env::var_os(IN_NAMESPACE).is_some()
}

/// Runs this program again with `args` in a new network namespace, and returns its exit code.
/// The child sees [`IN_NAMESPACE`] set.
pub fn reexec_in_namespace(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<i32> {
    if !is_root() {
        bail!("network partitions need root (a private network namespace and nftables)");
    }
    let exe = std::env::current_exe().context("cannot find this program")?;
    let status = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args(args)
        .env(IN_NAMESPACE, "1")
        .status()
        .context("cannot run unshare (util-linux)")?;
    Ok(status.code().unwrap_or(1))
}

/// For a test of this test binary that cuts the network between nodes: `Ok(true)` inside the
/// namespace (set up: go on with the test); otherwise runs the test `name` again inside a new
/// namespace, fails if it fails there, and returns `Ok(false)` (the test ran: return). Without
/// root it cannot run: it says so and returns `Ok(false)`.
pub fn test_in_namespace(name: &str) -> Result<bool> {
    if in_namespace() {
        setup()?;
        return Ok(true);
    }
    if !is_root() {
        eprintln!("SKIPPED {name}: kernel partitions need root (a private network namespace and nftables)");
        return Ok(false);
    }
    let args = [name, "--exact", "--nocapture", "--test-threads", "1"].map(std::ffi::OsString::from);
    let code = reexec_in_namespace(args)?;
    if code != 0 {
        bail!("{name} failed in its network namespace (exit code {code})");
    }
    Ok(false)
}

/// Inside the namespace: brings loopback up and creates the harness's empty rule set.
pub fn setup() -> Result<()> {
    run("ip", &["link", "set", "lo", "up"])?;
    run("nft", &["add", "table", "inet", TABLE])?;
    run(
        "nft",
        &["add", "chain", "inet", TABLE, "cut", "{ type filter hook output priority 0 ; policy accept ; }"],
    )?;
    run(
        "nft",
        &["add", "chain", "inet", TABLE, "loss", "{ type filter hook output priority 1 ; policy accept ; }"],
    )?;
    Ok(())
}

/// Drops a fifth of the packets sent from `ip`, at random. (Delay would need `tc netem`, which
/// the kernels this runs on lack; loss makes TCP retransmit, which delays too.)
pub fn lossy(ip: &str) -> Result<()> {
    run(
        "nft",
        &[
            "add", "rule", "inet", TABLE, "loss", "ip", "saddr", ip, "numgen", "random", "mod", "100", "<",
            "20", "drop",
        ],
    )
}

/// No packet is dropped at random any more.
pub fn unlossy() -> Result<()> {
    run("nft", &["flush", "chain", "inet", TABLE, "loss"])
}

/// Drops every packet from an address of `a` to one of `b` and, unless `one_way`, back.
pub fn cut(a: &[String], b: &[String], one_way: bool) -> Result<()> {
    for x in a {
        for y in b {
            run("nft", &["add", "rule", "inet", TABLE, "cut", "ip", "saddr", x, "ip", "daddr", y, "drop"])?;
            if !one_way {
                run(
                    "nft",
                    &["add", "rule", "inet", TABLE, "cut", "ip", "saddr", y, "ip", "daddr", x, "drop"],
                )?;
            }
        }
    }
    Ok(())
}

/// Like [`cut`] both ways, but every TCP packet between `a` and `b` is refused with a reset
/// instead of dropped: connections between them break at once, so nothing a node sent during
/// the cut (still in a socket's buffer) arrives once it heals — as when a machine behind a
/// firewall that rejects, or one that rebooted its network, is reached again. (The resets
/// themselves pass: a reset refused by the rule for the other direction would never arrive.)
pub fn cut_resetting(a: &[String], b: &[String]) -> Result<()> {
    for x in a {
        for y in b {
            for (from, to) in [(x, y), (y, x)] {
                run(
                    "nft",
                    &[
                        "add", "rule", "inet", TABLE, "cut", "ip", "saddr", from, "ip", "daddr", to, "tcp",
                        "flags", "&", "rst", "==", "0", "reject", "with", "tcp", "reset",
                    ],
                )?;
                run(
                    "nft",
                    &["add", "rule", "inet", TABLE, "cut", "ip", "saddr", from, "ip", "daddr", to, "drop"],
                )?;
            }
        }
    }
    Ok(())
}

/// Removes every cut.
pub fn heal() -> Result<()> {
    run("nft", &["flush", "chain", "inet", TABLE, "cut"])
}
