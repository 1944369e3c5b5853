//! What a benchmark prints: markdown tables, and the open-loop sweep as an SVG plot of latency
//! (p50 and p99, log scale) against offered load, one line per target.
use super::{LevelResult, Sweep};
use std::fmt::Write as _;

pub fn print_closed(results: &[LevelResult], baseline: Option<f64>, name_targets: bool) {
    for r in results {
        if let Some(e) = &r.first_error {
            eprintln!(
                "concurrency {}: {} errors; the first: {e}",
                r.concurrency, r.errors
            );
        }
    }
    println!(
        "| API | concurrency | requests | errors | images/s | p50 ms | p99 ms |{}",
        if baseline.is_some() { " vs CLI |" } else { "" }
    );
    println!(
        "|---|---|---|---|---|---|---|{}",
        if baseline.is_some() { "---|" } else { "" }
    );
    for r in results {
        let ratio = baseline
            .map(|b| format!(" {:.1}x |", r.images_per_s / b))
            .unwrap_or_default();
        let api = if name_targets {
            format!("{} {}", r.target, r.api)
        } else {
            r.api.clone()
        };
        println!(
            "| {api} | {} | {} | {} | {:.2} | {:.1} | {:.1} |{ratio}",
            r.concurrency, r.requests, r.errors, r.images_per_s, r.p50_ms, r.p99_ms
        );
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "–".into()
    }
}

/// The sweep as a markdown table.
pub fn open_table(s: &Sweep) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| load | offered req/s (drawn) | target | achieved req/s | images/s | p50 ms | p90 ms | p99 ms | max ms | queue p99 ms | TTFT p99 ms | errors | rows/step | images/step | cohorts/step | worker busy | encode / join / step |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for l in &s.levels {
        let errors: usize = l.errors.values().sum::<usize>() + l.not_sent;
        let server = l.server.as_ref();
        let phase = |p: &str| {
            server
                .and_then(|v| v.worker_seconds.get(p).copied())
                .unwrap_or(0.0)
        };
        let busy = phase("encode") + phase("join") + phase("step");
        let (busy_share, split) = if busy > 0.0 && l.seconds > 0.0 {
            (
                format!("{:.0}%", 100.0 * busy / l.seconds),
                format!(
                    "{:.0} / {:.0} / {:.0}%",
                    100.0 * phase("encode") / busy,
                    100.0 * phase("join") / busy,
                    100.0 * phase("step") / busy
                ),
            )
        } else {
            ("–".into(), "–".into())
        };
        let _ = writeln!(
            t,
            "| {} | {:.2} ({:.2}) | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {busy_share} | {split} |",
            l.load.map_or("–".into(), |f| format!("{:.0}%", f * 100.0)),
            l.offered_rps,
            l.realized_rps,
            l.target,
            l.achieved_rps,
            l.images_per_s,
            ms(l.latency_ms.p50),
            ms(l.latency_ms.p90),
            ms(l.latency_ms.p99),
            ms(l.latency_ms.max),
            ms(l.queue_ms.p99),
            ms(l.ttft_ms.p99),
            errors,
            opt(server.and_then(|v| v.decode_rows_mean), 1),
            opt(server.and_then(|v| v.decode_images_mean), 1),
            opt(server.and_then(|v| v.cohorts_mean), 2),
        );
    }
    t
}

/// Per target, the highest offered rate it kept up with: every request sent and answered,
/// at least 90% as fast as they arrived (the last answers come after the last arrival).
pub fn sustained(s: &Sweep) -> Vec<(String, Option<f64>)> {
    let mut out: Vec<(String, Option<f64>)> = vec![];
    for l in &s.levels {
        let kept_up =
            l.not_sent == 0 && l.ok == l.measured && l.achieved_rps >= 0.9 * l.realized_rps;
        let i = match out.iter().position(|(t, _)| *t == l.target) {
            Some(i) => i,
            None => {
                out.push((l.target.clone(), None));
                out.len() - 1
            }
        };
        if kept_up && out[i].1.is_none_or(|r| r < l.offered_rps) {
            out[i].1 = Some(l.offered_rps);
        }
    }
    out
}

pub fn print_open(s: &Sweep) {
    println!(
        "host: {} ({} cores); mix {}, seed {}",
        s.host, s.cores, s.mix, s.seed
    );
    if let Some(c) = s.capacity_rps {
        println!("capacity: {c:.2} requests/s (the best target's, closed loop)");
    }
    print!("{}", open_table(s));
    for (target, rate) in sustained(s) {
        match (rate, s.capacity_rps) {
            (Some(r), Some(c)) => println!(
                "{target} kept up with {r:.2} req/s ({:.0}% of capacity)",
                100.0 * r / c
            ),
            (Some(r), None) => println!("{target} kept up with {r:.2} req/s"),
            (None, _) => println!("{target} kept up with none of the rates"),
        }
    }
    for l in &s.levels {
        if let Some(e) = &l.first_error {
            eprintln!(
                "{} at {:.2} req/s: the first error: {e}",
                l.target, l.offered_rps
            );
        }
    }
}

/// Colours of the targets' lines, in order.
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// p50 (dashed) and p99 (solid) latency against offered load, log-scaled in latency.
pub fn svg(s: &Sweep) -> String {
    let (w, h) = (720.0, 440.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 60.0);
    let mut targets: Vec<&str> = vec![];
    for l in &s.levels {
        if !targets.contains(&l.target.as_str()) {
            targets.push(&l.target);
        }
    }
    let points = |t: &str, p: fn(&super::open_loop::OpenLevel) -> f64| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = s
            .levels
            .iter()
            .filter(|l| l.target == t)
            .map(|l| (l.offered_rps, p(l)))
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let all: Vec<(f64, f64)> = targets
        .iter()
        .flat_map(|t| {
            let mut v = points(t, |l| l.latency_ms.p50);
            v.extend(points(t, |l| l.latency_ms.p99));
            v
        })
        .collect();
    let x_max = all.iter().map(|p| p.0).fold(0.0, f64::max).max(1e-9) * 1.05;
    let (y_lo, y_hi) = all.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (y_lo, y_hi) = if all.is_empty() {
        (1.0, 10.0)
    } else {
        (
            10f64.powf(y_lo.log10().floor()),
            10f64.powf(y_hi.log10().ceil()),
        )
    };
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |x: f64| left + pw * x / x_max;
    let py = |y: f64| {
        top + ph * (1.0 - (y.log10() - y_lo.log10()) / (y_hi.log10() - y_lo.log10()).max(1e-9))
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle">Latency vs offered load ({}; {})</text>"#,
        left + pw / 2.0,
        xml(&s.mix),
        xml(&s.host)
    );
    // Axes, with a grid line per decade and five load ticks.
    let _ = writeln!(
        o,
        r#"<path d="M{left} {top} V{} H{}" stroke="black" fill="none"/>"#,
        top + ph,
        left + pw
    );
    let mut decade = y_lo;
    while decade <= y_hi * 1.0001 {
        let y = py(decade);
        let _ = writeln!(
            o,
            r##"<path d="M{left} {y:.1} H{}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            decade
        );
        decade *= 10.0;
    }
    for i in 0..=5 {
        let x = x_max * i as f64 / 5.0;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.1}</text>"#,
            px(x),
            top + ph + 18.0
        );
    }
    if let Some(c) = s.capacity_rps {
        let _ = writeln!(
            o,
            r##"<path d="M{:.1} {top} V{}" stroke="#888" stroke-dasharray="2 3"/><text x="{:.1}" y="{}" fill="#555" text-anchor="middle">capacity</text>"##,
            px(c),
            top + ph,
            px(c),
            top - 4.0
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">offered load (requests/s, Poisson arrivals)</text>"#,
        left + pw / 2.0,
        h - 16.0
    );
    let _ = writeln!(
        o,
        r#"<text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">latency (ms, log scale)</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, t) in targets.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        for (pts, dash, label) in [
            (points(t, |l| l.latency_ms.p99), "", "p99"),
            (
                points(t, |l| l.latency_ms.p50),
                r#" stroke-dasharray="6 4""#,
                "p50",
            ),
        ] {
            if pts.is_empty() {
                continue;
            }
            let d: Vec<String> = pts
                .iter()
                .enumerate()
                .map(|(j, &(x, y))| {
                    format!(
                        "{}{:.1} {:.1}",
                        if j == 0 { "M" } else { "L" },
                        px(x),
                        py(y)
                    )
                })
                .collect();
            let _ = writeln!(
                o,
                r#"<path d="{}" stroke="{colour}" stroke-width="2" fill="none"{dash}/>"#,
                d.join(" ")
            );
            for &(x, y) in &pts {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                    px(x),
                    py(y)
                );
            }
            let ly = top + 16.0 + 36.0 * i as f64 + if label == "p50" { 16.0 } else { 0.0 };
            let lx = left + pw + 14.0;
            let _ = writeln!(
                o,
                r#"<path d="M{lx} {ly} h28" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{} {label}</text>"#,
                lx + 34.0,
                ly + 4.0,
                xml(t)
            );
        }
    }
    o.push_str("</svg>\n");
    o
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
