//! # sled_memory — how much memory sled holds for a given page cache setting
//!
//! Inserts `--rows` rows shaped like a suspended flow's (≈ 30-byte keys, 40-byte values) into
//! one sled tree opened with `--cache-mib` of page cache, flushing every 4,000 rows as a node
//! does, and prints the process's RSS before and after and sled's size on disk. Nothing of
//! fetter runs: this isolates what sled itself keeps in memory beyond its `cache_capacity`.
//!
//! ```text
//! cargo run --release -p fetter-raft --example sled_memory -- --cache-mib 64 --rows 400000
//! ```
//!
//! The last line of stdout is one JSON object:
//! `{"cache_mib":…,"rows":…,"idle_rss_mib":…,"rss_mib":…,"disk_mib":…}`.

use anyhow::{Context, Result};
use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// sled's `cache_capacity`, in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// Rows to insert.
    #[arg(long, default_value_t = 400_000)]
    rows: u64,
}

/// This process's resident set, in MiB.
fn rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS in /proc/self/status")?;
    let kib: f64 = line.split_whitespace().nth(1).context("VmRSS without a value")?.parse()?;
    Ok(kib / 1024.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let db = sled::Config::new().path(dir.path()).cache_capacity(args.cache_mib << 20).open()?;
    let tree = db.open_tree("g1/sm/0")?;
    let idle = rss_mib()?;
    // Four rows per flow, as a flow suspended on a timer has: its record, the wait's record,
    // the timer and the timer index.
    for i in 0..args.rows {
        let (flow, tag) = (i / 4, [b'F', b'e', b't', b'T'][(i % 4) as usize]);
        let mut key = b"f\0\0\0\x07sleeper\0\0\0\x08".to_vec();
        key.extend_from_slice(format!("s-{flow:06}").as_bytes());
        key.push(tag);
        key.extend_from_slice(b"wake");
        tree.insert(key, vec![7u8; 40])?;
        if i % 4_000 == 3_999 {
            db.flush()?;
        }
    }
    db.flush()?;
    let (rss, disk) = (rss_mib()?, db.size_on_disk()? as f64 / 1_048_576.0);
    println!(
        "sled, cache_capacity {} MiB, {} rows: RSS {idle:.1} MiB before, {rss:.1} MiB after; {disk:.1} MiB on disk",
        args.cache_mib, args.rows
    );
    println!(
        "{{\"cache_mib\":{},\"rows\":{},\"idle_rss_mib\":{idle:.1},\"rss_mib\":{rss:.1},\"disk_mib\":{disk:.1}}}",
        args.cache_mib, args.rows
    );
    Ok(())
}
