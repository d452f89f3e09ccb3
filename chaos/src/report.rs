//! `report.md` of a run: the faults by kind, the operations by outcome, and every invariant with
//! how often it was checked and what it found.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::checker::CheckReport;
use crate::history::{self, FaultKind, FaultRecord, Op, OpRecord, Phase};

/// Writes `report.md` into the run directory `dir`.
pub fn write(dir: &Path, seed: u64, report: &CheckReport) -> Result<()> {
    let history: Vec<OpRecord> = history::read_lines(&dir.join(history::HISTORY))?;
    let faults: Vec<FaultRecord> = history::read_lines(&dir.join(history::FAULTS))?;
    crate::timeline::write_svg(dir, &format!("chaos run, seed {seed}"))?;
    let mut md = String::new();
    writeln!(md, "# Chaos run, seed {seed}\n")?;
    writeln!(md, "Verdict: **{}**\n", if report.passed() { "passed" } else { "FAILED" })?;
    writeln!(md, "![timeline]({})\n", crate::timeline::TIMELINE)?;

    let mut kinds: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for f in faults.iter().filter(|f| f.end_ms.is_some()) {
        let name = match f.kind {
            FaultKind::Kill { .. } => "kill -9",
            FaultKind::Pause { .. } => "SIGSTOP",
            FaultKind::Terminate { .. } => "SIGTERM",
            FaultKind::Partition { one_way: false, .. } => "partition",
            FaultKind::Partition { one_way: true, .. } => "one-way partition",
            FaultKind::Lossy { .. } => "packet loss (20 %)",
            FaultKind::Replace { .. } => "node lost and replaced",
        };
        let e = kinds.entry(name).or_default();
        e.0 += 1;
        e.1 += f.end_ms.unwrap_or(f.start_ms).saturating_sub(f.start_ms);
    }
    writeln!(md, "## Faults\n\n| kind | count | total time |\n|---|---|---|")?;
    for (kind, (n, ms)) in &kinds {
        writeln!(md, "| {kind} | {n} | {:.1} s |", *ms as f64 / 1000.0)?;
    }

    let mut ops: BTreeMap<(&str, &str), [usize; 3]> = BTreeMap::new();
    for r in &history {
        let op = match r.op {
            Op::Start { .. } => "start",
            Op::Send { .. } => "send",
        };
        let slot = match r.phase {
            Phase::Ok => 0,
            Phase::Fail => 1,
            Phase::Info => 2,
            Phase::Invoke => continue,
        };
        let flow_type = match &r.op {
            Op::Start { flow_type, .. } | Op::Send { flow_type, .. } => flow_type.as_str(),
        };
        ops.entry((op, flow_type)).or_default()[slot] += 1;
    }
    writeln!(
        md,
        "\n## Operations\n\n| operation | flow type | ok | fail | info (unknown) |\n|---|---|---|---|---|"
    )?;
    for ((op, flow_type), [ok, fail, info]) in &ops {
        writeln!(md, "| {op} | {flow_type} | {ok} | {fail} | {info} |")?;
    }

    writeln!(md, "\n## Invariants\n\n| invariant | checked | violations |\n|---|---|---|")?;
    for inv in &report.invariants {
        writeln!(md, "| {} | {} | {} |", inv.name, inv.checked, inv.violations.len())?;
    }
    for inv in report.invariants.iter().filter(|i| !i.violations.is_empty()) {
        writeln!(md, "\n### {}\n", inv.name)?;
        for v in inv.violations.iter().take(50) {
            writeln!(md, "- {v}")?;
        }
    }
    std::fs::write(dir.join("report.md"), md)?;
    Ok(())
}
