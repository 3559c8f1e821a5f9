//! `--plot FILE.svg`: admitted tokens per second over time against the
//! limits, 429s marked, one panel per strategy, all on one time scale.
//! Composed with the `svg` crate (which escapes text and attributes).

use svg::node::element::path::Data;
use svg::node::element::{Line, Path, Rectangle, Text, Title};
use svg::Document;

use super::report::{LimitSpec, Row};

const W: f64 = 900.0;
const PANEL_H: f64 = 190.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;
/// The plot area's width.
const PW: f64 = W - LEFT - RIGHT;
const INPUT_COLOUR: &str = "#1f5fbf";
const OUTPUT_COLOUR: &str = "#2e8b3a";

/// A coordinate rounded to a tenth of a pixel (shorter files, same picture).
fn px(v: f64) -> f32 {
    ((v * 10.0).round() / 10.0) as f32
}

/// Input and output tokens admitted per second, by bucket of the time the
/// attempt was sent (when the server charges the input).
struct Series {
    input: Vec<f64>,
    output: Vec<f64>,
}

impl Series {
    fn of(row: &Row, bucket: f64, n_buckets: usize) -> Series {
        let mut input = vec![0.0; n_buckets];
        let mut output = vec![0.0; n_buckets];
        for a in &row.attempts_log {
            if let Some(u) = a.usage {
                let b = ((a.sent.as_secs_f64() / bucket) as usize).min(n_buckets - 1);
                input[b] += u.charged_input_tokens(false) as f64 / bucket;
                output[b] += u.output_tokens as f64 / bucket;
            }
        }
        Series { input, output }
    }
}

/// The scales every panel shares.
struct Frame {
    t_max: f64,
    y_max: f64,
    bucket: f64,
    input_line: f64,
    output_line: f64,
}

/// One panel's position on the page.
struct Panel<'a> {
    frame: &'a Frame,
    y0: f64,
}

impl Panel<'_> {
    fn x(&self, t: f64) -> f64 {
        LEFT + PW * (t / self.frame.t_max)
    }

    fn y(&self, v: f64) -> f64 {
        self.y0 + PANEL_H - PANEL_H * (v / self.frame.y_max).min(1.0)
    }
}

fn text(x: f64, y: f64, content: impl Into<String>) -> Text {
    Text::new(content).set("x", px(x)).set("y", px(y))
}

/// Renders the plot. `bucket` is the width of the averaging window in seconds.
pub fn svg(rows: &[Row], limits: &LimitSpec, bucket: f64) -> String {
    let t_max = rows.iter().map(|r| r.seconds).fold(1.0, f64::max);
    let n_buckets = (t_max / bucket).ceil().max(1.0) as usize;
    let input_line = limits.input_tokens_per_minute as f64 / 60.0;
    let output_line = limits.output_tokens_per_minute as f64 / 60.0;
    // One y scale for every panel: four times the input limit line, so the
    // steady state is readable; the opening burst (a full bucket spent at
    // once) is clipped and labelled with its value.
    let frame = Frame {
        t_max,
        y_max: (input_line * 4.0).max(output_line * 4.0).max(1.0),
        bucket,
        input_line,
        output_line,
    };
    let h = TOP + rows.len() as f64 * (PANEL_H + GAP) + 10.0;
    let mut doc = Document::new()
        .set("width", W)
        .set("height", h)
        .set("viewBox", (0.0, 0.0, W, h))
        .set("font-family", "sans-serif")
        .set("font-size", 11)
        .add(
            Rectangle::new()
                .set("width", "100%")
                .set("height", "100%")
                .set("fill", "white"),
        )
        .add(
            text(LEFT, 20.0, format!(
                "Tokens admitted per second ({bucket:.0} s windows, by time sent); dashed: the limits; red ticks: 429s"
            ))
            .set("font-size", 14)
            .set("font-weight", "bold"),
        );
    for (k, r) in rows.iter().enumerate() {
        let panel = Panel {
            frame: &frame,
            y0: TOP + k as f64 * (PANEL_H + GAP) + 14.0,
        };
        let series = Series::of(r, bucket, n_buckets);
        doc = draw_panel(doc, &panel, r, &series, limits);
    }
    format!("{doc}\n")
}

/// One strategy's panel: title, frame, axes, limit lines, series, 429s, legend.
fn draw_panel(
    mut doc: Document,
    p: &Panel<'_>,
    r: &Row,
    series: &Series,
    limits: &LimitSpec,
) -> Document {
    doc = doc
        .add(
            text(
                LEFT,
                p.y0 - 4.0,
                format!(
                    "{} — {:.1} s, {} ok / {} failed, {} 429s",
                    r.name, r.seconds, r.ok, r.failed, r.rate_limited
                ),
            )
            .set("font-size", 12)
            .set("font-weight", "bold"),
        )
        .add(
            Rectangle::new()
                .set("x", LEFT)
                .set("y", px(p.y0))
                .set("width", px(PW))
                .set("height", PANEL_H)
                .set("fill", "none")
                .set("stroke", "#999"),
        );
    doc = draw_axes(doc, p);
    for (v, colour) in [
        (p.frame.input_line, INPUT_COLOUR),
        (p.frame.output_line, OUTPUT_COLOUR),
    ] {
        doc = doc.add(
            Line::new()
                .set("x1", LEFT)
                .set("x2", px(LEFT + PW))
                .set("y1", px(p.y(v)))
                .set("y2", px(p.y(v)))
                .set("stroke", colour)
                .set("stroke-dasharray", "6 4"),
        );
    }
    doc = draw_series(doc, p, r.seconds, &series.input, INPUT_COLOUR, "input");
    doc = draw_series(doc, p, r.seconds, &series.output, OUTPUT_COLOUR, "output");
    for a in r.attempts_log.iter().filter(|a| a.status == Some(429)) {
        let xt = px(p.x(a.sent.as_secs_f64()));
        doc = doc.add(
            Line::new()
                .set("x1", xt)
                .set("x2", xt)
                .set("y1", px(p.y0 + PANEL_H - 10.0))
                .set("y2", px(p.y0 + PANEL_H))
                .set("stroke", "red")
                .set("stroke-width", 1),
        );
    }
    let lx = LEFT + PW - 330.0;
    doc.add(
        text(
            lx,
            p.y0 - 4.0,
            format!("input (ITPM {}/min)", limits.input_tokens_per_minute),
        )
        .set("fill", INPUT_COLOUR),
    )
    .add(
        text(
            lx + 170.0,
            p.y0 - 4.0,
            format!("output (OTPM {}/min)", limits.output_tokens_per_minute),
        )
        .set("fill", OUTPUT_COLOUR),
    )
}

/// The y labels (0, half, full scale) and the time labels.
fn draw_axes(mut doc: Document, p: &Panel<'_>) -> Document {
    for frac in [0.0, 0.5, 1.0] {
        let v = p.frame.y_max * frac;
        doc = doc.add(
            text(LEFT - 4.0, p.y(v) + 4.0, format!("{v:.0}"))
                .set("text-anchor", "end")
                .set("fill", "#555"),
        );
    }
    let step = nice_step(p.frame.t_max);
    let mut t = 0.0;
    while t <= p.frame.t_max + 1e-9 {
        doc = doc.add(
            text(p.x(t), p.y0 + PANEL_H + 13.0, format!("{t:.0} s"))
                .set("text-anchor", "middle")
                .set("fill", "#555"),
        );
        t += step;
    }
    doc
}

/// A series as a step line up to the row's end, and the values above the
/// scale written where they are clipped.
fn draw_series(
    mut doc: Document,
    p: &Panel<'_>,
    until: f64,
    data: &[f64],
    colour: &str,
    label: &str,
) -> Document {
    let bucket = p.frame.bucket;
    let mut d = Data::new();
    for (i, v) in data.iter().enumerate() {
        let t0 = i as f64 * bucket;
        let t1 = ((i + 1) as f64 * bucket).min(p.frame.t_max);
        if t0 > until {
            break;
        }
        let start = (px(p.x(t0)), px(p.y(*v)));
        d = if i == 0 {
            d.move_to(start)
        } else {
            d.line_to(start)
        };
        d = d.line_to((px(p.x(t1)), px(p.y(*v))));
    }
    doc = doc.add(
        Path::new()
            .set("d", d)
            .set("fill", "none")
            .set("stroke", colour)
            .set("stroke-width", 1.5)
            .add(Title::new(format!("{label} tokens/s"))),
    );
    let label_dy = if label == "output" { 11.0 } else { 0.0 };
    for (i, v) in data.iter().enumerate() {
        if *v > p.frame.y_max && i as f64 * bucket <= until {
            doc = doc.add(
                text(
                    p.x(i as f64 * bucket) + 2.0,
                    p.y0 + 11.0 + label_dy,
                    format!("{v:.0}/s ↑"),
                )
                .set("fill", colour)
                .set("font-size", 10),
            );
        }
    }
    doc
}

fn nice_step(t_max: f64) -> f64 {
    for step in [5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0] {
        if t_max / step <= 10.0 {
            return step;
        }
    }
    1200.0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use svg::node::element::tag::{self, Type};
    use svg::parser::Event;

    use super::*;
    use crate::report::{row, Charged};
    use crate::run::{Attempt, Outcome};
    use tower_llm_limits::wire::Usage;

    fn limits() -> LimitSpec {
        LimitSpec {
            requests_per_minute: 50,
            input_tokens_per_minute: 30_000,
            output_tokens_per_minute: 8_000,
            requests_capacity: 50.0,
            input_capacity: 30_000.0,
            output_capacity: 8_000.0,
            output_mode: "realtime",
        }
    }

    fn attempt(sent: u64, status: u16, input: u64) -> Attempt {
        Attempt {
            request: Some(0),
            sent: Duration::from_secs(sent),
            status: Some(status),
            usage: (status == 200).then_some(Usage {
                input_tokens: input,
                output_tokens: 10,
                ..Usage::default()
            }),
        }
    }

    fn a_row(name: &str, attempts: Vec<Attempt>) -> Row {
        let outcome = Outcome {
            index: 0,
            ok: true,
            error: None,
            latency: Duration::from_secs(1),
            finished: Duration::from_secs(35),
        };
        row(
            name,
            &[outcome],
            attempts,
            Charged::default(),
            &limits(),
            None,
        )
    }

    #[test]
    fn one_panel_per_strategy_with_its_series_429s_and_clipped_bursts() {
        let rows = [
            a_row("naive <&>", vec![attempt(0, 429, 0), attempt(3, 200, 100)]),
            // 30,000 tokens in the first 10 s window: far above the scale.
            a_row("tower-llm-limits", vec![attempt(1, 200, 300_000)]),
        ];
        let out = svg(&rows, &limits(), 10.0);
        let (mut paths, mut red_ticks, mut texts) = (0, 0, Vec::new());
        for event in svg::read(&out).expect("well-formed SVG") {
            match event {
                Event::Tag(tag::Path, Type::Start, attrs) => {
                    paths += 1;
                    assert!(attrs.get("d").is_some_and(|d| d.starts_with('M')));
                }
                Event::Tag(tag::Line, _, attrs)
                    if attrs.get("stroke").is_some_and(|s| *s == "red") =>
                {
                    red_ticks += 1;
                }
                Event::Text(t) => texts.push(t.to_string()),
                _ => {}
            }
        }
        assert_eq!(paths, 4, "input and output per strategy");
        assert_eq!(red_ticks, 1, "one 429");
        assert!(
            texts
                .iter()
                .any(|t| t.starts_with("naive &lt;&amp;&gt; — 35.0 s")),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t == "30000/s ↑"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "input (ITPM 30000/min)"));
    }

    #[test]
    fn time_labels_stay_about_ten_per_panel() {
        assert_eq!(nice_step(28.8), 5.0);
        assert_eq!(nice_step(127.0), 15.0);
        assert_eq!(nice_step(1_000.0), 120.0);
        assert_eq!(nice_step(100_000.0), 1_200.0);
    }
}
