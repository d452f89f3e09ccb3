//! `fetter-chaos`: seeded fault-injection runs against real node processes, and the checker.
//!
//! ```text
//! fetter-chaos run --nodes 3 --profile ci --seed 42 --out ./chaos-runs/ci-42
//! fetter-chaos check ./chaos-runs/ci-42
//! ```
//!
//! The nodes are this program too (`fetter-chaos node …`: the `shop` application).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fetter_chaos::{checker, net, run};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "fetter-chaos", about = "Seeded chaos runs against real fetter node processes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProfileName {
    /// 3 minutes of faults (CI).
    Ci,
    /// `--minutes` of faults (by hand).
    Long,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a cluster, run the workload under the seeded faults, heal, check, report.
    Run {
        /// Nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Profile.
        #[arg(long, value_enum, default_value_t = ProfileName::Ci)]
        profile: ProfileName,
        /// Minutes of faults for the `long` profile.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// The seed (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The run directory (default `./chaos-runs/<profile>-<seed>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run without kernel partitions (no root needed).
        #[arg(long)]
        no_partitions: bool,
        /// Never lose a node for good (no removal and replacement).
        #[arg(long)]
        no_replacements: bool,
        /// Plant a bug in every node, to see the checker catch it: amo-rerun, timer-early, timer-late, outbox-ack-first.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(fetter::bugs::BUGS.iter().copied()))]
        plant_bug: Option<String>,
    },
    /// Check a saved run directory again.
    Check {
        /// The run directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    // The nodes of a run are this program's `node` command.
    if std::env::args().nth(1).as_deref() == Some("node") {
        return fetter_examples::shop::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Check { dir } => match checker::check_dir(&dir, &checker::CheckOptions::default()) {
            Ok(report) => {
                println!("{}", report.summary());
                // The report and the picture again, from the files as they are now.
                let seed = std::fs::read_to_string(dir.join(fetter_chaos::history::RUN))
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .and_then(|v| v.get("seed").and_then(serde_json::Value::as_u64))
                    .unwrap_or(0);
                if let Err(e) = fetter_chaos::report::write(&dir, seed, &report) {
                    eprintln!("error: cannot write the report: {e:#}");
                    return ExitCode::from(2);
                }
                if report.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::Run { nodes, profile, minutes, seed, out, no_partitions, no_replacements, plant_bug } => {
            let partitions = !no_partitions;
            if partitions && !net::in_namespace() {
                // Again, inside a network namespace of its own: its rules and processes die with it.
                return match net::reexec_in_namespace(std::env::args_os().skip(1)) {
                    Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::from(2)
                    }
                };
            }
            let seed = seed.unwrap_or_else(rand::random);
            println!("FETTER_CHAOS_SEED={seed}");
            let (name, duration) = match profile {
                ProfileName::Ci => ("ci", Duration::from_secs(180)),
                ProfileName::Long => ("long", Duration::from_secs(minutes * 60)),
            };
            let out = out.unwrap_or_else(|| PathBuf::from(format!("chaos-runs/{name}-{seed}")));
            let replacements = !no_replacements;
            let opts = run::RunOptions { nodes, seed, duration, partitions, out, plant_bug, replacements };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(run::run(opts)) {
                Ok(true) => {
                    println!("passed (seed {seed})");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("FAILED (seed {seed})");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error (seed {seed}): {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
