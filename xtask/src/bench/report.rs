//! Ratios, the Markdown table, the JSON file and the SVG plots of one run.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::{CaseResult, Report};

/// The figure a case is judged by: Gbit/s, p50 microseconds, or connections per second.
fn primary(c: &CaseResult) -> Option<f64> {
    c.gbps
        .or(c.pingpong.as_ref().map(|p| p.p50_us))
        .or(c.conn_per_s)
}

fn find<'a>(rep: &'a Report, path: &str, case: &str) -> Option<&'a CaseResult> {
    rep.cases
        .iter()
        .find(|c| c.path == path && c.case == case && c.error.is_none())
}

/// The peers skiff is judged against in issue 16.
const PEERS: [&str; 4] = ["nginx", "haproxy", "envoy-c1", "envoy-c2"];

/// The best peer on `case` and its primary figure: lowest p50 for latency, else highest.
fn best_peer<'a>(rep: &'a Report, case: &str) -> Option<(&'a str, f64)> {
    let lower_better = case.starts_with("lat");
    PEERS
        .iter()
        .filter_map(|p| Some((*p, find(rep, p, case).and_then(primary)?)))
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .reduce(|a, b| if (b.1 < a.1) == lower_better { b } else { a })
}

/// Each case's primary figure as a ratio to direct, to Envoy --concurrency 1 and to the best
/// peer.
pub fn fill_ratios(rep: &mut Report) {
    let best: Vec<Option<(String, f64)>> = rep
        .cases
        .iter()
        .map(|c| best_peer(rep, &c.case).map(|(n, v)| (n.to_string(), v)))
        .collect();
    for (c, b) in rep.cases.iter_mut().zip(best) {
        if let (Some(v), Some((n, b))) = (primary(c), b) {
            c.best_peer = Some(n);
            c.vs_best_peer = Some(v / b);
        }
    }
    let base: Vec<(Option<f64>, Option<f64>)> = rep
        .cases
        .iter()
        .map(|c| {
            (
                find(rep, "direct", &c.case).and_then(primary),
                find(rep, "envoy-c1", &c.case).and_then(primary),
            )
        })
        .collect();
    for (c, (d, e)) in rep.cases.iter_mut().zip(base) {
        let v = primary(c);
        c.vs_direct = v.zip(d).map(|(v, d)| v / d);
        c.vs_envoy_c1 = v.zip(e).map(|(v, e)| v / e);
    }
}

/// One-line summary for the progress output.
pub fn short(c: &CaseResult) -> String {
    if let Some(e) = &c.error {
        return format!("error: {}", e.lines().next().unwrap_or(""));
    }
    if let Some(g) = c.gbps {
        return format!("{g:.2} Gbit/s");
    }
    if let Some(p) = &c.pingpong {
        return format!(
            "p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us ({} trips)",
            p.p50_us, p.p99_us, p.p999_us, p.count
        );
    }
    if let Some(r) = c.conn_per_s {
        return format!("{r:.0} conn/s");
    }
    String::new()
}

fn f(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.prec$}"),
        _ => "-".into(),
    }
}

fn x(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}x"),
        _ => "-".into(),
    }
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn paths(rep: &Report) -> Vec<String> {
    rep.paths.iter().map(|p| p.path.clone()).collect()
}

/// Render the Markdown report.
pub fn markdown(rep: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# skiff bench, run {}\n", rep.started_unix);
    let _ = writeln!(
        s,
        "- machine: {} cores ({}), kernel {}",
        rep.cores, rep.cpu_model, rep.kernel
    );
    let _ = writeln!(
        s,
        "- load average at start `{}`, at end `{}` (anything above ~0.5 before the run means other work shared the cores)",
        rep.loadavg_start, rep.loadavg_end
    );
    let _ = writeln!(
        s,
        "- {} s per case{}; connection rate with {} client threads; skiff {}",
        rep.secs_per_case,
        if rep.quick { " (--quick)" } else { "" },
        rep.conn_threads,
        rep.skiff_rev
    );
    for (k, v) in &rep.versions {
        let _ = writeln!(s, "- {k}: `{v}`");
    }
    let _ = writeln!(
        s,
        "\nRatios: `xdirect` and `xenvoy` divide this path's figure by direct's and by envoy-c1's \
         (for latency the p50; below 1 is faster). `best peer` is the best of nginx, HAProxy and \
         Envoy (c1, c2) on that case. `added` is p50 minus direct's p50. Proxy CPU is \
         utime+stime of the proxy process tree during the case.\n"
    );

    let _ = writeln!(s, "## Paths\n\n| path | what |\n|---|---|");
    for p in &rep.paths {
        let err = p
            .error
            .as_ref()
            .map(|e| format!(" **unavailable: {}**", e.lines().next().unwrap_or("")))
            .unwrap_or_default();
        let _ = writeln!(s, "| {} | {}{err} |", p.path, p.description);
    }

    let _ = writeln!(
        s,
        "\n## L4 bulk throughput (iperf3, Gbit/s at the receiver)\n\n\
         | path | 1 stream | xdirect | xenvoy | proxy CPU (cores) | 1 stream, 1 KiB writes | xdirect | xenvoy | proxy CPU (cores) | 4 streams | xdirect | xenvoy | proxy CPU (cores) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in paths(rep) {
        let mut row = format!("| {p} |");
        for case in ["tput-1", "tput-1k", "tput-4"] {
            let c = rep.cases.iter().find(|c| c.path == p && c.case == case);
            let cores = c.and_then(|c| c.proxy_cpu_s.map(|cpu| cpu / c.wall_s.max(1e-9)));
            let _ = write!(
                row,
                " {} | {} | {} | {} |",
                f(c.and_then(|c| c.gbps), 2),
                x(c.and_then(|c| c.vs_direct)),
                x(c.and_then(|c| c.vs_envoy_c1)),
                f(cores, 2)
            );
        }
        let _ = writeln!(s, "{row}");
    }

    for (case, title) in [("lat-64", "64 B"), ("lat-4k", "4 KiB")] {
        let direct = find(rep, "direct", case).and_then(|c| c.pingpong.as_ref().map(|p| p.p50_us));
        let envoy_added = find(rep, "envoy-c1", case)
            .and_then(|c| c.pingpong.as_ref().map(|p| p.p50_us))
            .zip(direct)
            .map(|(e, d)| e - d);
        let best = best_peer(rep, case);
        let best_added = best.zip(direct).map(|((n, b), d)| (n, b - d));
        let _ = writeln!(
            s,
            "\n## TCP request/response latency, {title} ping-pong (one connection, microseconds)\n\n\
             | path | p50 | p99 | p99.9 | xdirect (p50) | added p50 | added / envoy-c1's | added / best peer's{} | round trips/s | proxy CPU us/trip |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            best.map_or(String::new(), |(n, _)| format!(" ({n})"))
        );
        for p in paths(rep) {
            let c = rep.cases.iter().find(|c| c.path == p && c.case == case);
            let pp = c.and_then(|c| c.pingpong.as_ref());
            let added = pp.map(|p| p.p50_us).zip(direct).map(|(v, d)| v - d);
            let rel = added
                .zip(envoy_added)
                .and_then(|(a, e)| (e > 0.0).then(|| a / e));
            let rel_best = added
                .zip(best_added)
                .and_then(|(a, (_, b))| (b > 0.0).then(|| a / b));
            let rate = pp.map(|p| p.count as f64 / p.secs.max(1e-9));
            let cpu = c
                .and_then(|c| c.proxy_cpu_s)
                .zip(pp)
                .map(|(cpu, p)| cpu * 1e6 / (p.count.max(1) as f64));
            let _ = writeln!(
                s,
                "| {p} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f(pp.map(|p| p.p50_us), 1),
                f(pp.map(|p| p.p99_us), 1),
                f(pp.map(|p| p.p999_us), 1),
                x(c.and_then(|c| c.vs_direct)),
                f(added, 1),
                x(rel),
                x(rel_best),
                f(rate, 0),
                f(cpu, 1)
            );
        }
    }

    let _ = writeln!(
        s,
        "\n## Connection rate (connect, 1-byte round trip, close)\n\n\
         | path | conn/s | xdirect | xenvoy | x best peer{} | proxy CPU us/conn | of which user us/conn | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|",
        best_peer(rep, "conn-rate").map_or(String::new(), |(n, _)| format!(" ({n})"))
    );
    for p in paths(rep) {
        let c = rep
            .cases
            .iter()
            .find(|c| c.path == p && c.case == "conn-rate");
        let per_conn = |secs: Option<f64>| {
            secs.zip(c.and_then(|c| c.conn.as_ref()))
                .map(|(cpu, r)| cpu * 1e6 / (r.count.max(1) as f64))
        };
        let _ = writeln!(
            s,
            "| {p} | {} | {} | {} | {} | {} | {} | {} |",
            f(c.and_then(|c| c.conn_per_s), 0),
            x(c.and_then(|c| c.vs_direct)),
            x(c.and_then(|c| c.vs_envoy_c1)),
            x(c.and_then(|c| c.vs_best_peer)),
            f(per_conn(c.and_then(|c| c.proxy_cpu_s)), 1),
            f(per_conn(c.and_then(|c| c.proxy_user_s)), 1),
            c.and_then(|c| c.conn.as_ref())
                .map_or("-".into(), |r| r.errors.to_string())
        );
    }

    let _ = writeln!(
        s,
        "\n## Memory (VmRSS of the proxy process tree, MB)\n\n| path | idle | after the run | max during cases |\n|---|---:|---:|---:|"
    );
    for p in rep.paths.iter().filter(|p| p.path != "direct") {
        let max = rep
            .cases
            .iter()
            .filter(|c| c.path == p.path)
            .filter_map(|c| c.proxy_rss_kb)
            .max();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            p.path,
            mb(p.idle_rss_kb),
            mb(p.rss_after_kb),
            mb(max)
        );
    }

    sockmap_section(rep, &mut s);

    let _ = writeln!(s, "\n## Issue 6 goals (reported, not enforced)\n");
    let get = |path: &str, case: &str| find(rep, path, case);
    for case in ["tput-1", "tput-4"] {
        if let Some(c) = get("skiff-l4", case) {
            let _ = writeln!(
                s,
                "- skiff-l4 {case}: {} of direct (goal >= 0.85x), {} of envoy-c1 (goal >= 1.2x)",
                x(c.vs_direct),
                x(c.vs_envoy_c1)
            );
        }
    }
    for case in ["tput-1", "tput-4", "conn-rate"] {
        if let Some(c) = get("skiff-fastpath", case) {
            let _ = writeln!(
                s,
                "- skiff-fastpath {case}: {} of direct (goal >= 0.97x)",
                x(c.vs_direct)
            );
        }
    }
    for case in ["lat-64", "lat-4k"] {
        let p50 = |path: &str| get(path, case).and_then(|c| c.pingpong.as_ref().map(|p| p.p50_us));
        if let (Some(d), Some(sk), Some(e)) = (p50("direct"), p50("skiff-l4"), p50("envoy-c1")) {
            let _ = writeln!(
                s,
                "- {case} added p50: skiff-l4 {:.1} us vs envoy-c1 {:.1} us = {} (goal <= 0.50x)",
                sk - d,
                e - d,
                x(((e - d) > 0.0).then(|| (sk - d) / (e - d)))
            );
        }
    }
    for p in rep.paths.iter().filter(|p| p.path.starts_with("skiff")) {
        if let Some(k) = p.idle_rss_kb {
            let _ = writeln!(
                s,
                "- {} idle RSS {:.1} MB (goal <= 15 MB)",
                p.path,
                k as f64 / 1024.0
            );
        }
    }

    issue16_goals(rep, &mut s);

    let errors: Vec<&CaseResult> = rep.cases.iter().filter(|c| c.error.is_some()).collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\n## Errors\n");
        for c in errors {
            let _ = writeln!(
                s,
                "- {} {}: {}",
                c.path,
                c.case,
                c.error.as_deref().unwrap_or("").replace('\n', " ")
            );
        }
    }
    s
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Grouped vertical bars: one group per path, one bar per series.
fn grouped_bars(
    file: &Path,
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[(&str, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    let n = groups.len();
    if n == 0 {
        return Ok(());
    }
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-6)
        * 1.15;
    let root = SVGBackend::new(file, (140 * n as u32 + 160, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Path names sit in a band below zero, inside the plot (no custom x key points needed).
    let ymin = -ymax * 0.08;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(10)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, ymin..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let prec = if ymax >= 100.0 {
        0
    } else if ymax >= 10.0 {
        1
    } else {
        2
    };
    let ylab = |v: &f64| {
        if *v < 0.0 {
            String::new()
        } else {
            format!("{v:.prec$}")
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&ylab)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let style = TextStyle::from(("sans-serif", 14).into_font()).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    chart
        .draw_series(
            groups
                .iter()
                .enumerate()
                .map(|(i, g)| Text::new(g.clone(), (i as f64 + 0.5, ymin / 2.0), style.clone())),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 0.0), (n as f64, 0.0)],
            BLACK,
        )))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let w = 0.8 / series.len().max(1) as f64;
    for (si, (name, vals)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let x0 = i as f64 + 0.1 + w * si as f64;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + w * 0.92, v)],
                    color.filled(),
                ))
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn plots(rep: &Report, dir: &Path) -> anyhow::Result<()> {
    let groups = paths(rep);
    let pick = |case: &str, g: &dyn Fn(&CaseResult) -> Option<f64>| -> Vec<Option<f64>> {
        groups
            .iter()
            .map(|p| find(rep, p, case).and_then(g))
            .collect()
    };
    grouped_bars(
        &dir.join("throughput.svg"),
        "L4 bulk throughput (iperf3)",
        "Gbit/s",
        &groups,
        &[
            ("1 stream", pick("tput-1", &|c| c.gbps)),
            ("1 stream, 1 KiB writes", pick("tput-1k", &|c| c.gbps)),
            ("4 streams", pick("tput-4", &|c| c.gbps)),
        ],
    )?;
    for (case, title, file) in [
        ("lat-64", "Ping-pong latency, 64 B", "latency-64.svg"),
        ("lat-4k", "Ping-pong latency, 4 KiB", "latency-4k.svg"),
    ] {
        grouped_bars(
            &dir.join(file),
            title,
            "microseconds",
            &groups,
            &[
                (
                    "p50",
                    pick(case, &|c| c.pingpong.as_ref().map(|p| p.p50_us)),
                ),
                (
                    "p99",
                    pick(case, &|c| c.pingpong.as_ref().map(|p| p.p99_us)),
                ),
                (
                    "p99.9",
                    pick(case, &|c| c.pingpong.as_ref().map(|p| p.p999_us)),
                ),
            ],
        )?;
    }
    grouped_bars(
        &dir.join("conn-rate.svg"),
        "Connection rate (connect, 1-byte round trip, close)",
        "connections/s",
        &groups,
        &[("conn/s", pick("conn-rate", &|c| c.conn_per_s))],
    )?;
    Ok(())
}

/// Write results.json, results.md and the SVGs into `dir`; return the Markdown.
pub fn write_all(rep: &Report, dir: &Path) -> anyhow::Result<String> {
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(rep)?)?;
    let md = markdown(rep);
    std::fs::write(dir.join("results.md"), &md)?;
    if let Err(e) = plots(rep, dir) {
        eprintln!("bench: plots failed: {e:#}");
    }
    Ok(md)
}

/// Where `--sockmap` wins: skiff-sockmap against skiff-ebpf (same capture, same proxy) per case.
fn sockmap_section(rep: &Report, s: &mut String) {
    let rows: Vec<(String, f64, f64, bool)> = rep
        .cases
        .iter()
        .filter(|c| c.path == "skiff-sockmap")
        .filter_map(|on| {
            let off = find(rep, "skiff-ebpf", &on.case)?;
            let (a, b) = (primary(on)?, primary(off)?);
            // Latency: lower is better; throughput and rates: higher is better.
            let lower_better = on.case.starts_with("lat");
            Some((on.case.clone(), a, b, lower_better))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Sockmap: skiff-sockmap vs skiff-ebpf (same run)\n\n\
         | case | sockmap on | off | gain (on better when > 1) |\n|---|---:|---:|---:|"
    );
    for (case, on, off, lower_better) in rows {
        let gain = if lower_better { off / on } else { on / off };
        let _ = writeln!(s, "| {case} | {on:.2} | {off:.2} | {gain:.2}x |");
    }
}

/// Issue 16: the proxied paths against the best of nginx, HAProxy and Envoy, and idle RSS.
fn issue16_goals(rep: &Report, s: &mut String) {
    let _ = writeln!(
        s,
        "\n## Issue 16 goals against the best peer (reported, not enforced)\n"
    );
    let proxied = ["skiff-l4", "skiff-ebpf", "skiff-iptables"];
    if let Some((peer, best)) = best_peer(rep, "conn-rate") {
        for p in proxied {
            if let Some(v) = find(rep, p, "conn-rate").and_then(|c| c.conn_per_s) {
                let _ = writeln!(
                    s,
                    "- {p} conn-rate: {v:.0} conn/s vs {peer} {best:.0} = {} (goal >= 1.00x)",
                    x(Some(v / best))
                );
            }
        }
    }
    let p50 =
        |path: &str| find(rep, path, "lat-64").and_then(|c| c.pingpong.as_ref().map(|p| p.p50_us));
    if let (Some(d), Some((peer, best))) = (p50("direct"), best_peer(rep, "lat-64")) {
        for p in proxied {
            if let Some(v) = p50(p) {
                let _ = writeln!(
                    s,
                    "- {p} lat-64 added p50: {:.1} us vs {peer} {:.1} us = {} (goal <= 1.00x)",
                    v - d,
                    best - d,
                    x(((best - d) > 0.0).then(|| (v - d) / (best - d)))
                );
            }
        }
    }
    for p in rep.paths.iter().filter(|p| p.path == "skiff-ebpf") {
        if let Some(k) = p.idle_rss_kb {
            let _ = writeln!(
                s,
                "- skiff-ebpf (eBPF capture loaded) idle RSS {:.1} MB (goal <= 15 MB)",
                k as f64 / 1024.0
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::load::ConnRate;

    fn conn(path: &str, per_s: f64) -> CaseResult {
        CaseResult {
            case: "conn-rate".into(),
            path: path.into(),
            conn_per_s: Some(per_s),
            conn: Some(ConnRate {
                count: per_s as u64,
                secs: 1.0,
                errors: 0,
            }),
            ..Default::default()
        }
    }

    fn lat(path: &str, p50: f64) -> CaseResult {
        CaseResult {
            case: "lat-64".into(),
            path: path.into(),
            pingpong: Some(crate::bench::load::PingPong {
                count: 1000,
                secs: 1.0,
                p50_us: p50,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
                mean_us: p50,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ratios_are_against_the_best_peer_per_case() {
        let mut rep = Report {
            cases: vec![
                conn("direct", 10000.0),
                conn("skiff-l4", 4000.0),
                conn("nginx", 5000.0),
                conn("haproxy", 4500.0),
                conn("envoy-c1", 2000.0),
                lat("direct", 20.0),
                lat("skiff-l4", 50.0),
                lat("nginx", 40.0),
                lat("envoy-c2", 60.0),
            ],
            ..Default::default()
        };
        fill_ratios(&mut rep);
        let c = find(&rep, "skiff-l4", "conn-rate").unwrap();
        // Highest conn/s wins; lowest p50 wins.
        assert_eq!(c.best_peer.as_deref(), Some("nginx"));
        assert!((c.vs_best_peer.unwrap() - 0.8).abs() < 1e-9);
        let l = find(&rep, "skiff-l4", "lat-64").unwrap();
        assert_eq!(l.best_peer.as_deref(), Some("nginx"));
        assert!((l.vs_best_peer.unwrap() - 1.25).abs() < 1e-9);
        let md = markdown(&rep);
        // Added p50 30 us against nginx's 20 us.
        assert!(
            md.contains("- skiff-l4 lat-64 added p50: 30.0 us vs nginx 20.0 us = 1.50x"),
            "{md}"
        );
        assert!(
            md.contains("- skiff-l4 conn-rate: 4000 conn/s vs nginx 5000 = 0.80x"),
            "{md}"
        );
    }
}
