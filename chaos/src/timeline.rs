//! `timeline.svg` of a run: throughput and latency over time with the faults shaded over them.
//!
//! The picture is plain SVG built by hand (no plotting crate): the x axis is seconds since the
//! first record of the run; the top panel shows the completed (`ok`) operations per second, one
//! line per node the operations were sent to plus a total, and the `info` (unknown outcome)
//! operations per second as red marks; the bottom panel shows the latency (invoke to outcome,
//! every outcome) per second, median and maximum, on a log scale. Every fault is a translucent
//! rectangle over both panels, coloured by kind and labelled with its kind and node(s).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::history::{self, FaultKind, FaultRecord, OpRecord, Phase};

/// The timeline file of a run directory.
pub const TIMELINE: &str = "timeline.svg";

const WIDTH: f64 = 1200.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
/// The top panel (operations per second).
const TOP_Y0: f64 = 64.0;
const TOP_Y1: f64 = 316.0;
/// The bottom panel (latency).
const BOT_Y0: f64 = 336.0;
const BOT_Y1: f64 = 548.0;

const NODE_COLOURS: [&str; 8] =
    ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const TOTAL_COLOUR: &str = "#222222";
const INFO_COLOUR: &str = "#d62728";
const P50_COLOUR: &str = "#1f77b4";
const MAX_COLOUR: &str = "#ff7f0e";
/// Fault kinds in legend order: (name, colour).
const FAULT_COLOURS: [(&str, &str); 5] = [
    ("kill", "#e41a1c"),
    ("pause", "#377eb8"),
    ("terminate", "#ff7f00"),
    ("partition", "#984ea3"),
    ("lossy", "#4daf4a"),
];
const FAULT_OPACITY: f64 = 0.16;

/// Reads `history.jsonl` and `faults.jsonl` of the run directory `dir` and writes
/// `dir/timeline.svg` (see [`render`]).
pub fn write_svg(dir: &Path, title: &str) -> Result<()> {
    let history: Vec<OpRecord> = history::read_lines(&dir.join(history::HISTORY))?;
    let faults: Vec<FaultRecord> = history::read_lines(&dir.join(history::FAULTS))?;
    let path = dir.join(TIMELINE);
    std::fs::write(&path, render(&history, &faults, title))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Renders the timeline of a run as a self-contained SVG document (about 1200×600 px, white
/// background). `faults` may hold each fault twice (at its start and when healed): the records
/// are merged by `id`, and a fault that was never healed extends to the end of the run.
pub fn render(history: &[OpRecord], faults: &[FaultRecord], title: &str) -> String {
    let mut svg = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(&mut svg, history, faults, title);
    svg
}

/// Per-second data of the run.
struct Buckets {
    /// `ok` per second, by the node the operation was sent to.
    ok_by_node: BTreeMap<u64, Vec<u64>>,
    /// `ok` per second, all nodes.
    ok_total: Vec<u64>,
    /// `info` per second.
    info: Vec<u64>,
    /// Latencies (ms) of the operations that completed in each second.
    latencies: Vec<Vec<u64>>,
    /// Operations that completed with each phase: ok, fail, info.
    outcomes: [usize; 3],
}

fn bucket_history(history: &[OpRecord], t0: u64, n: usize) -> Buckets {
    let bucket = |t: u64| (((t.saturating_sub(t0)) / 1000) as usize).min(n - 1);
    let mut b = Buckets {
        ok_by_node: BTreeMap::new(),
        ok_total: vec![0; n],
        info: vec![0; n],
        latencies: vec![Vec::new(); n],
        outcomes: [0; 3],
    };
    let mut invoked: HashMap<u64, u64> = HashMap::new();
    for r in history {
        b.ok_by_node.entry(r.node).or_insert_with(|| vec![0; n]);
        let i = bucket(r.t_ms);
        match r.phase {
            Phase::Invoke => {
                invoked.insert(r.id, r.t_ms);
                continue;
            }
            Phase::Ok => {
                b.outcomes[0] += 1;
                b.ok_total[i] += 1;
                if let Some(v) = b.ok_by_node.get_mut(&r.node) {
                    v[i] += 1;
                }
            }
            Phase::Fail => b.outcomes[1] += 1,
            Phase::Info => {
                b.outcomes[2] += 1;
                b.info[i] += 1;
            }
        }
        if let Some(t) = invoked.remove(&r.id) {
            b.latencies[i].push(r.t_ms.saturating_sub(t));
        }
    }
    b
}

fn render_into(
    svg: &mut String,
    history: &[OpRecord],
    faults: &[FaultRecord],
    title: &str,
) -> std::fmt::Result {
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(svg, r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##)?;
    if history.is_empty() {
        writeln!(svg, r#"<text x="{LEFT}" y="26" font-size="16" font-weight="bold">{}</text>"#, esc(title))?;
        writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="16" text-anchor="middle" fill="#666666">no operations</text>"##,
            WIDTH / 2.0,
            HEIGHT / 2.0
        )?;
        return svg.write_str("</svg>\n");
    }

    let faults = history::merge_faults(faults);
    let times = history
        .iter()
        .map(|r| r.t_ms)
        .chain(faults.iter().flat_map(|f| std::iter::once(f.start_ms).chain(f.end_ms)));
    let (t0, t_end) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let n = ((t_end - t0) / 1000 + 1) as usize;
    let b = bucket_history(history, t0, n);

    // x: seconds since t0 over [0, n].
    let secs = n as f64;
    let x = |s: f64| LEFT + s / secs * (WIDTH - LEFT - RIGHT);
    let x_ms = |t: u64| x(t.saturating_sub(t0) as f64 / 1000.0);

    // Title and summary.
    writeln!(svg, r#"<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text>"#, esc(title))?;
    let [ok, fail, info] = b.outcomes;
    writeln!(
        svg,
        r##"<text x="{}" y="22" text-anchor="end" fill="#444444">{} operations: {ok} ok, {fail} fail, {info} info · {} faults · {:.1} s</text>"##,
        WIDTH - RIGHT,
        ok + fail + info,
        faults.len(),
        (t_end - t0) as f64 / 1000.0
    )?;

    // Legend.
    let mut legend: Vec<(String, &str, &str)> = Vec::new();
    for (k, node) in b.ok_by_node.keys().enumerate() {
        legend.push((format!("n{node} ok/s"), NODE_COLOURS[k % NODE_COLOURS.len()], "line"));
    }
    legend.push(("total ok/s".into(), TOTAL_COLOUR, "line"));
    legend.push(("info/s".into(), INFO_COLOUR, "dot"));
    legend.push(("latency p50".into(), P50_COLOUR, "line"));
    legend.push(("latency max".into(), MAX_COLOUR, "dash"));
    for (name, colour) in FAULT_COLOURS {
        legend.push((name.into(), colour, "box"));
    }
    writeln!(svg, r#"<g font-size="11">"#)?;
    let mut lx = LEFT;
    let ly = 44.0;
    for (label, colour, style) in &legend {
        match *style {
            "line" | "dash" => writeln!(
                svg,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"{}/>"#,
                lx + 18.0,
                if *style == "dash" { r#" stroke-dasharray="4 2""# } else { "" }
            )?,
            "dot" => writeln!(svg, r#"<circle cx="{}" cy="{ly}" r="3" fill="{colour}"/>"#, lx + 9.0)?,
            _ => writeln!(
                svg,
                r#"<rect x="{lx}" y="{}" width="18" height="10" fill="{colour}" fill-opacity="{}" stroke="{colour}"/>"#,
                ly - 5.0,
                FAULT_OPACITY * 2.0
            )?,
        }
        writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, lx + 22.0, ly + 4.0, esc(label))?;
        lx += 22.0 + text_width(label, 11.0) + 14.0;
    }
    writeln!(svg, "</g>")?;

    // Fault rectangles over both panels, under the data.
    writeln!(svg, r#"<g id="faults">"#)?;
    let mut lanes: Vec<f64> = Vec::new();
    let mut labels = String::new();
    for f in &faults {
        let (name, colour) = fault_style(&f.kind);
        let label = fault_label(&f.kind);
        let x0 = x_ms(f.start_ms);
        // Never healed: to the right edge of the plot.
        let x1 = f.end_ms.map_or(x(secs), x_ms).max(x0 + 1.0);
        let tip = format!(
            "{label}: {:.1}–{} s",
            f.start_ms.saturating_sub(t0) as f64 / 1000.0,
            match f.end_ms {
                Some(e) => format!("{:.1}", e.saturating_sub(t0) as f64 / 1000.0),
                None => "end (not healed)".into(),
            }
        );
        writeln!(svg, r#"<g class="fault {name}">"#)?;
        for (y0, y1) in [(TOP_Y0, TOP_Y1), (BOT_Y0, BOT_Y1)] {
            writeln!(
                svg,
                r#"<rect x="{x0:.1}" y="{y0}" width="{:.1}" height="{}" fill="{colour}" fill-opacity="{FAULT_OPACITY}"><title>{}</title></rect>"#,
                x1 - x0,
                y1 - y0,
                esc(&tip)
            )?;
        }
        // The label goes in the first lane (row at the top of the top panel) where it does not
        // overlap the previous label; if none is free, in the lane that frees up first.
        let w = text_width(&label, 10.0);
        let lane = match lanes.iter().position(|&end| end + 4.0 <= x0) {
            Some(l) => l,
            None if lanes.len() < 6 => {
                lanes.push(f64::MIN);
                lanes.len() - 1
            }
            None => lanes.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map(|(l, _)| l).unwrap_or(0),
        };
        lanes[lane] = x0 + 2.0 + w;
        writeln!(
            labels,
            r##"<text class="{name}" x="{:.1}" y="{}" font-size="10" fill="{colour}" stroke="#ffffff" stroke-width="3" paint-order="stroke">{}</text>"##,
            x0 + 2.0,
            TOP_Y0 + 11.0 + 11.0 * lane as f64,
            esc(&label)
        )?;
        writeln!(svg, "</g>")?;
    }
    writeln!(svg, "</g>")?;

    // x axis: grid over both panels, tick labels under the bottom one.
    let step = nice_step(secs, 12.0);
    writeln!(svg, r##"<g id="x-axis" stroke="#e0e0e0">"##)?;
    let mut s = 0.0;
    while s <= secs + 1e-9 {
        let xs = x(s);
        for (y0, y1) in [(TOP_Y0, TOP_Y1), (BOT_Y0, BOT_Y1)] {
            writeln!(svg, r#"<line x1="{xs:.1}" y1="{y0}" x2="{xs:.1}" y2="{y1}"/>"#)?;
        }
        writeln!(
            svg,
            r##"<text x="{xs:.1}" y="{}" text-anchor="middle" stroke="none" fill="#333333">{}</text>"##,
            BOT_Y1 + 16.0,
            fmt_num(s)
        )?;
        s += step;
    }
    writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" stroke="none" fill="#333333">seconds since the first record</text>"##,
        (LEFT + WIDTH - RIGHT) / 2.0,
        BOT_Y1 + 36.0
    )?;
    writeln!(svg, "</g>")?;

    // Top panel: ok per second per node and total, info per second.
    let top_max = b.ok_total.iter().chain(&b.info).copied().max().unwrap_or(0).max(1) as f64;
    let top_step = nice_step(top_max, 5.0);
    let top_max = (top_max / top_step).ceil() * top_step;
    let y_top = |v: f64| TOP_Y1 - v / top_max * (TOP_Y1 - TOP_Y0);
    writeln!(svg, r#"<g id="throughput">"#)?;
    let mut v = 0.0;
    while v <= top_max + 1e-9 {
        let yv = y_top(v);
        writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{yv:.1}" x2="{}" y2="{yv:.1}" stroke="#eeeeee"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333333">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            yv + 4.0,
            fmt_num(v)
        )?;
        v += top_step;
    }
    axis_title(svg, "ok operations / s", (TOP_Y0 + TOP_Y1) / 2.0)?;
    let line = |values: &[u64]| -> String {
        let mut pts = String::new();
        for (i, v) in values.iter().enumerate() {
            let _ = write!(pts, "{:.1},{:.1} ", x(i as f64 + 0.5), y_top(*v as f64));
        }
        pts.trim_end().to_string()
    };
    for (k, (node, values)) in b.ok_by_node.iter().enumerate() {
        writeln!(
            svg,
            r#"<polyline id="ok-n{node}" fill="none" stroke="{}" stroke-width="1.5" points="{}"><title>n{node} ok/s</title></polyline>"#,
            NODE_COLOURS[k % NODE_COLOURS.len()],
            line(values)
        )?;
    }
    writeln!(
        svg,
        r#"<polyline id="ok-total" fill="none" stroke="{TOTAL_COLOUR}" stroke-width="2" points="{}"><title>total ok/s</title></polyline>"#,
        line(&b.ok_total)
    )?;
    for (i, &count) in b.info.iter().enumerate().filter(|(_, c)| **c > 0) {
        writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{INFO_COLOUR}"><title>{count} info at {i} s</title></circle>"#,
            x(i as f64 + 0.5),
            y_top(count as f64)
        )?;
    }
    frame(svg, TOP_Y0, TOP_Y1)?;
    writeln!(svg, "</g>")?;

    // Bottom panel: latency p50 and max per second, log scale from 1 ms.
    let lat_max = b.latencies.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let decades = lat_max.log10().ceil().max(1.0);
    let y_lat = |ms: f64| BOT_Y1 - ms.max(1.0).log10() / decades * (BOT_Y1 - BOT_Y0);
    writeln!(svg, r#"<g id="latency">"#)?;
    for d in 0..=decades as u32 {
        let ms = 10f64.powi(d as i32);
        let yv = y_lat(ms);
        let label = if ms >= 1000.0 { format!("{} s", fmt_num(ms / 1000.0)) } else { format!("{ms} ms") };
        writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{yv:.1}" x2="{}" y2="{yv:.1}" stroke="#eeeeee"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333333">{label}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            yv + 4.0
        )?;
    }
    axis_title(svg, "latency (log)", (BOT_Y0 + BOT_Y1) / 2.0)?;
    let mut p50 = String::new();
    let mut max = String::new();
    let mut pen_up = true;
    for (i, lats) in b.latencies.iter().enumerate() {
        let mut sorted = lats.clone();
        sorted.sort_unstable();
        let (Some(&median), Some(&top)) = (sorted.get((sorted.len().saturating_sub(1)) / 2), sorted.last())
        else {
            pen_up = true;
            continue;
        };
        let cmd = if pen_up { 'M' } else { 'L' };
        let xi = x(i as f64 + 0.5);
        write!(p50, "{cmd}{xi:.1},{:.1} ", y_lat(median as f64))?;
        write!(max, "{cmd}{xi:.1},{:.1} ", y_lat(top as f64))?;
        pen_up = false;
    }
    writeln!(
        svg,
        r#"<path id="latency-max" fill="none" stroke="{MAX_COLOUR}" stroke-width="1.5" stroke-dasharray="4 2" d="{}"><title>latency max</title></path>"#,
        max.trim_end()
    )?;
    writeln!(
        svg,
        r#"<path id="latency-p50" fill="none" stroke="{P50_COLOUR}" stroke-width="2" d="{}"><title>latency p50</title></path>"#,
        p50.trim_end()
    )?;
    frame(svg, BOT_Y0, BOT_Y1)?;
    writeln!(svg, "</g>")?;

    // The fault labels last, over the shading and the lines.
    writeln!(svg, r#"<g id="fault-labels">"#)?;
    svg.push_str(&labels);
    writeln!(svg, "</g>")?;
    svg.write_str("</svg>\n")
}

/// The legend name and colour of a fault kind.
fn fault_style(kind: &FaultKind) -> (&'static str, &'static str) {
    let i = match kind {
        FaultKind::Kill { .. } => 0,
        FaultKind::Pause { .. } => 1,
        FaultKind::Terminate { .. } => 2,
        FaultKind::Partition { .. } => 3,
        FaultKind::Lossy { .. } => 4,
        FaultKind::Replace { .. } => 0,
    };
    FAULT_COLOURS[i]
}

/// `kill n2`, `part n3|n1,n2`, `part n1→n2,n3` (one way).
fn fault_label(kind: &FaultKind) -> String {
    let nodes = |ns: &[u64]| ns.iter().map(|n| format!("n{n}")).collect::<Vec<_>>().join(",");
    match kind {
        FaultKind::Kill { node } => format!("kill n{node}"),
        FaultKind::Pause { node } => format!("pause n{node}"),
        FaultKind::Terminate { node } => format!("term n{node}"),
        FaultKind::Lossy { node } => format!("lossy n{node}"),
        FaultKind::Replace { node, by } => format!("replace n{node}→n{by}"),
        FaultKind::Partition { a, b, one_way } => {
            format!("part {}{}{}", nodes(a), if *one_way { "→" } else { "|" }, nodes(b))
        }
    }
}

fn axis_title(svg: &mut String, text: &str, y_mid: f64) -> std::fmt::Result {
    writeln!(
        svg,
        r##"<text x="16" y="{y_mid}" transform="rotate(-90 16 {y_mid})" text-anchor="middle" fill="#333333">{}</text>"##,
        esc(text)
    )
}

fn frame(svg: &mut String, y0: f64, y1: f64) -> std::fmt::Result {
    writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{y0}" width="{}" height="{}" fill="none" stroke="#888888"/>"##,
        WIDTH - LEFT - RIGHT,
        y1 - y0
    )
}

/// A step of 1, 2 or 5 times a power of ten giving at most about `ticks` ticks over `[0, max]`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * pow).find(|s| *s >= raw).unwrap_or(10.0 * pow);
    step.max(1.0)
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

/// A rough width of `text` in px at `size` (sans-serif averages a bit over half the size).
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.62
}

/// Escapes text for SVG content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::history::Op;

    const T0: u64 = 1_700_000_000_000;

    fn rec(id: u64, t_ms: u64, node: u64, phase: Phase) -> OpRecord {
        OpRecord {
            id,
            t_ms,
            process: (id % 4) as u32,
            node,
            phase,
            op: Op::Start { flow_type: "order".into(), instance: format!("o-{id}"), input: "{}".into() },
            error: None,
        }
    }

    /// 3 nodes over ~10 s, an operation every 50 ms, with a few `info` and `fail`.
    fn synthetic_history() -> Vec<OpRecord> {
        let mut h = Vec::new();
        for id in 0..200u64 {
            let t = T0 + id * 50;
            let node = id % 3 + 1;
            h.push(rec(id, t, node, Phase::Invoke));
            let phase = match id % 17 {
                0 => Phase::Info,
                5 => Phase::Fail,
                _ => Phase::Ok,
            };
            h.push(rec(id, t + 5 + id % 40 * 7, node, phase));
        }
        h.sort_by_key(|r| r.t_ms);
        h
    }

    fn partition_fault() -> Vec<FaultRecord> {
        let kind = FaultKind::Partition { a: vec![3], b: vec![1, 2], one_way: false };
        vec![
            FaultRecord { id: 1, start_ms: T0 + 3_000, end_ms: None, kind: kind.clone() },
            FaultRecord { id: 1, start_ms: T0 + 3_000, end_ms: Some(T0 + 6_500), kind },
        ]
    }

    /// Checks the SVG nests: every opened element is closed in order (a small tag scanner).
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "starts with <svg");
        assert!(svg.trim_end().ends_with("</svg>"), "ends with </svg>");
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let close = rest[open..].find('>').unwrap() + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "unescaped < in {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "closing {name}");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
            let text = &rest[close + 1..];
            let next = text.find('<').unwrap_or(text.len());
            assert!(!text[..next].contains('>'), "unescaped > in text {:?}", &text[..next]);
            rest = text;
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
    }

    #[test]
    fn renders_three_nodes_and_a_fault() {
        let svg = render(&synthetic_history(), &partition_fault(), "chaos run, seed 7 <a & b>");
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
        assert!(svg.contains("chaos run, seed 7 &lt;a &amp; b&gt;"));
        for node in 1..=3 {
            assert!(svg.contains(&format!(r#"<polyline id="ok-n{node}""#)), "line of n{node}");
        }
        assert!(svg.contains(r#"<polyline id="ok-total""#));
        assert!(svg.contains(r#"<path id="latency-p50""#));
        assert!(svg.contains(r#"<path id="latency-max""#));
        // The fault: merged into one (two rectangles, one per panel), labelled, healed at 6.5 s.
        assert_eq!(svg.matches(r#"<g class="fault partition">"#).count(), 1);
        let fault = &svg[svg.find(r#"<g class="fault partition">"#).unwrap()..];
        let fault = &fault[..fault.find("</g>").unwrap()];
        assert_eq!(fault.matches("<rect").count(), 2);
        assert!(fault.contains("<title>part n3|n1,n2: 3.0–6.5 s</title>"));
        let labels = &svg[svg.find(r#"<g id="fault-labels">"#).unwrap()..];
        assert_eq!(labels.matches(r#"<text class="partition""#).count(), 1);
        assert!(labels.contains(">part n3|n1,n2</text>"));
        // The info operations are marked.
        assert!(svg.contains(&format!(r#"fill="{INFO_COLOUR}"><title>"#)));
    }

    #[test]
    fn unhealed_fault_extends_to_the_end() {
        let faults = vec![FaultRecord {
            id: 4,
            start_ms: T0 + 8_000,
            end_ms: None,
            kind: FaultKind::Kill { node: 2 },
        }];
        let svg = render(&synthetic_history(), &faults, "t");
        assert_well_formed(&svg);
        assert!(svg.contains(r#"<text class="kill""#) && svg.contains(">kill n2</text>"));
        assert!(svg.contains("8.0–end (not healed) s"));
        // Ends at the right edge of the plot.
        let rect = &svg[svg.find(r#"<g class="fault kill">"#).unwrap()..];
        let rect = &rect[rect.find("<rect").unwrap()..];
        let attr = |name: &str| -> f64 {
            let a = &rect[rect.find(&format!(r#" {name}=""#)).unwrap() + name.len() + 3..];
            a[..a.find('"').unwrap()].parse().unwrap()
        };
        assert!((attr("x") + attr("width") - (WIDTH - RIGHT)).abs() < 0.2);
    }

    #[test]
    fn empty_history_says_so() {
        let svg = render(&[], &[], "chaos run, seed 1");
        assert_well_formed(&svg);
        assert!(svg.contains("no operations"));
    }

    #[test]
    fn writes_the_file_from_a_run_directory() {
        let dir = std::env::temp_dir().join(format!("fetter-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = |v: Vec<String>| v.join("\n") + "\n";
        let h = synthetic_history().iter().map(|r| serde_json::to_string(r).unwrap()).collect();
        let f = partition_fault().iter().map(|r| serde_json::to_string(r).unwrap()).collect();
        std::fs::write(dir.join(history::HISTORY), lines(h)).unwrap();
        std::fs::write(dir.join(history::FAULTS), lines(f)).unwrap();
        write_svg(&dir, "chaos run, seed 3").unwrap();
        let svg = std::fs::read_to_string(dir.join(TIMELINE)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_well_formed(&svg);
        assert!(svg.contains("part n3|n1,n2"));
    }
}
