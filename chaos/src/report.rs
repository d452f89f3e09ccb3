//! `report.md` of a run: the faults by kind, the operations by outcome, and every invariant with
//! how often it was checked and what it found.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::checker::CheckReport;
use crate::history::{self, ControlAction, FaultKind, FaultRecord, Op, OpRecord, Phase};

/// How long after a fault's end its stall is still looked for.
const STALL_TAIL_MS: u64 = 5_000;

/// The longest time within `[from, to]` without an acknowledgement (`oks`: sorted times).
fn longest_stall(oks: &[u64], from: u64, to: u64) -> u64 {
    let mut last = from;
    let mut longest = 0;
    for &t in oks.iter().filter(|t| **t >= from && **t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to.saturating_sub(last))
}

/// Writes `report.md` into the run directory `dir`.
pub fn write(dir: &Path, seed: u64, report: &CheckReport) -> Result<()> {
    let history: Vec<OpRecord> = history::read_lines(&dir.join(history::HISTORY))?;
    let faults: Vec<FaultRecord> = history::read_lines(&dir.join(history::FAULTS))?;
    crate::timeline::write_svg(dir, &format!("chaos run, seed {seed}"))?;
    let mut md = String::new();
    writeln!(md, "# Chaos run, seed {seed}\n")?;
    writeln!(md, "Verdict: **{}**\n", if report.passed() { "passed" } else { "FAILED" })?;
    writeln!(md, "![timeline]({})\n", crate::timeline::TIMELINE)?;

    let oks: Vec<u64> = {
        let mut t: Vec<u64> = history.iter().filter(|r| r.phase == Phase::Ok).map(|r| r.t_ms).collect();
        t.sort_unstable();
        t
    };
    let mut kinds: BTreeMap<&str, (usize, u64, Vec<u64>)> = BTreeMap::new();
    for f in history::merge_faults(&faults).iter().filter(|f| f.end_ms.is_some()) {
        let name = match f.kind {
            FaultKind::Kill { .. } => "kill -9",
            FaultKind::Pause { .. } => "SIGSTOP",
            FaultKind::Terminate { .. } => "SIGTERM",
            FaultKind::Partition { one_way: false, .. } => "partition",
            FaultKind::Partition { one_way: true, .. } => "one-way partition",
            FaultKind::Lossy { .. } => "packet loss (20 %)",
            FaultKind::Replace { .. } => "node lost and replaced",
        };
        let end = f.end_ms.unwrap_or(f.start_ms);
        let e = kinds.entry(name).or_default();
        e.0 += 1;
        e.1 += end.saturating_sub(f.start_ms);
        e.2.push(longest_stall(&oks, f.start_ms, end + STALL_TAIL_MS));
    }
    writeln!(
        md,
        "## Faults\n\nStall: the longest time without any acknowledged operation from a fault's start \
         to {STALL_TAIL_MS} ms after its end (the whole cluster's progress, not only the faulty \
         node's).\n\n| kind | count | total time | stall p50 | stall max |\n|---|---|---|---|---|"
    )?;
    for (kind, (n, ms, stalls)) in &mut kinds {
        stalls.sort_unstable();
        let p50 = stalls.get(stalls.len() / 2).copied().unwrap_or(0);
        let max = stalls.last().copied().unwrap_or(0);
        writeln!(md, "| {kind} | {n} | {:.1} s | {p50} ms | {max} ms |", *ms as f64 / 1000.0)?;
    }

    let mut ops: BTreeMap<(&str, &str), [usize; 3]> = BTreeMap::new();
    for r in &history {
        let op = match &r.op {
            Op::Start { .. } => "start",
            Op::Send { .. } => "send",
            Op::Control { action: ControlAction::Restart, .. } => "restart",
            Op::Control { action: ControlAction::Cancel, .. } => "cancel",
            Op::Control { action: ControlAction::SetEffect { .. }, .. } => "effect-set",
        };
        let slot = match r.phase {
            Phase::Ok => 0,
            Phase::Fail => 1,
            Phase::Info => 2,
            Phase::Invoke => continue,
        };
        let flow_type = match &r.op {
            Op::Start { flow_type, .. } | Op::Send { flow_type, .. } | Op::Control { flow_type, .. } => {
                flow_type.as_str()
            }
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

#[cfg(test)]
mod tests {
    use super::longest_stall;

    #[test]
    fn the_longest_stall_counts_the_edges_of_the_window() {
        let oks = [100, 200, 900, 1_000, 5_000];
        assert_eq!(longest_stall(&oks, 150, 1_100), 700);
        assert_eq!(longest_stall(&oks, 1_000, 4_000), 3_000);
        assert_eq!(longest_stall(&[], 0, 500), 500);
    }
}
