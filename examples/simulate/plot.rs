//! `--plot FILE.svg`: admitted tokens per second over time against the
//! limits, 429s marked, one panel per strategy, all on one time scale.
//! Hand-written SVG, no dependency.

use std::fmt::Write as _;

use super::report::{LimitSpec, Row};

const W: f64 = 900.0;
const PANEL_H: f64 = 190.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the plot. `bucket` is the width of the averaging window in seconds.
pub fn svg(rows: &[Row], limits: &LimitSpec, bucket: f64) -> String {
    let t_max = rows.iter().map(|r| r.seconds).fold(1.0, f64::max);
    let n_buckets = (t_max / bucket).ceil().max(1.0) as usize;
    let input_line = limits.input_tokens_per_minute as f64 / 60.0;
    let output_line = limits.output_tokens_per_minute as f64 / 60.0;

    // Series per row: input and output tokens admitted per second, by bucket
    // of the time the attempt was sent (when the server charges the input).
    let series: Vec<(Vec<f64>, Vec<f64>)> = rows
        .iter()
        .map(|r| {
            let mut inp = vec![0.0; n_buckets];
            let mut out = vec![0.0; n_buckets];
            for a in &r.attempts_log {
                if let Some(u) = a.usage {
                    let b = ((a.sent.as_secs_f64() / bucket) as usize).min(n_buckets - 1);
                    inp[b] += u.charged_input_tokens(false) as f64 / bucket;
                    out[b] += u.output_tokens as f64 / bucket;
                }
            }
            (inp, out)
        })
        .collect();
    // One y scale for every panel: four times the input limit line, so the
    // steady state is readable; the opening burst (a full bucket spent at
    // once) is clipped and labelled with its value.
    let y_max = (input_line * 4.0).max(output_line * 4.0).max(1.0);

    let h = TOP + rows.len() as f64 * (PANEL_H + GAP) + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">Tokens admitted per second ({bucket:.0} s windows, by time sent); dashed: the limits; red ticks: 429s</text>"#
    );
    let pw = W - LEFT - RIGHT;
    for (k, (r, (inp, out))) in rows.iter().zip(series.iter()).enumerate() {
        let y0 = TOP + k as f64 * (PANEL_H + GAP) + 14.0;
        let x = |t: f64| LEFT + pw * (t / t_max);
        let y = |v: f64| y0 + PANEL_H - PANEL_H * (v / y_max).min(1.0);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-size="12" font-weight="bold">{} — {:.1} s, {} ok / {} failed, {} 429s</text>"#,
            y0 - 4.0,
            esc(&r.name),
            r.seconds,
            r.ok,
            r.failed,
            r.rate_limited
        );
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y0:.1}" width="{pw:.1}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
        );
        // Axes labels.
        for frac in [0.0, 0.5, 1.0] {
            let v = y_max * frac;
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{:.0}</text>"##,
                LEFT - 4.0,
                y(v) + 4.0,
                v
            );
        }
        let step = nice_step(t_max);
        let mut t = 0.0;
        while t <= t_max + 1e-9 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{:.0} s</text>"##,
                x(t),
                y0 + PANEL_H + 13.0,
                t
            );
            t += step;
        }
        // Limit lines.
        for (v, color) in [(input_line, "#1f5fbf"), (output_line, "#2e8b3a")] {
            let _ = writeln!(
                s,
                r#"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{color}" stroke-dasharray="6 4"/>"#,
                LEFT + pw,
                y(v),
                y(v)
            );
        }
        // Series as step lines.
        for (data, color, label) in [(inp, "#1f5fbf", "input"), (out, "#2e8b3a", "output")] {
            let mut d = String::new();
            for (i, v) in data.iter().enumerate() {
                let t0 = i as f64 * bucket;
                let t1 = ((i + 1) as f64 * bucket).min(t_max);
                if t0 > r.seconds {
                    break;
                }
                let cmd = if i == 0 { 'M' } else { 'L' };
                let _ = write!(
                    d,
                    "{cmd}{:.1},{:.1} L{:.1},{:.1} ",
                    x(t0),
                    y(*v),
                    x(t1),
                    y(*v)
                );
            }
            let _ = writeln!(
                s,
                r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="1.5"><title>{label} tokens/s</title></path>"#
            );
            for (i, v) in data.iter().enumerate() {
                if *v > y_max && i as f64 * bucket <= r.seconds {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" fill="{color}" font-size="10">{:.0}/s ↑</text>"#,
                        x(i as f64 * bucket) + 2.0,
                        y0 + 11.0 + if label == "output" { 11.0 } else { 0.0 },
                        v
                    );
                }
            }
        }
        // 429s.
        for a in r.attempts_log.iter().filter(|a| a.status == Some(429)) {
            let xt = x(a.sent.as_secs_f64());
            let _ = writeln!(
                s,
                r#"<line x1="{xt:.1}" x2="{xt:.1}" y1="{:.1}" y2="{:.1}" stroke="red" stroke-width="1"/>"#,
                y0 + PANEL_H - 10.0,
                y0 + PANEL_H
            );
        }
        // Legend.
        let lx = LEFT + pw - 330.0;
        let _ = writeln!(
            s,
            r##"<text x="{lx:.1}" y="{:.1}" fill="#1f5fbf">input (ITPM {}/min)</text><text x="{:.1}" y="{:.1}" fill="#2e8b3a">output (OTPM {}/min)</text>"##,
            y0 - 4.0,
            limits.input_tokens_per_minute,
            lx + 170.0,
            y0 - 4.0,
            limits.output_tokens_per_minute
        );
    }
    s.push_str("</svg>\n");
    s
}

fn nice_step(t_max: f64) -> f64 {
    for step in [5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0] {
        if t_max / step <= 10.0 {
            return step;
        }
    }
    1200.0
}
