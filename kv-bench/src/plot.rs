//! The step-latency plot: milliseconds per decode step against the step's position, one line
//! per system and cache kind. A cached line stays flat; an uncached one climbs.

use svg::node::element::{Line, Polyline, Rectangle, Text};
use svg::Document;

/// One line of the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Latency of each step, in milliseconds.
    pub step_ms: Vec<f64>,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// Renders the series as an SVG document.
///
/// ```
/// use kv_bench::plot::{step_latency_svg, Series};
///
/// let svg = step_latency_svg("demo", 10, &[Series { label: "none".into(), step_ms: vec![1.0, 2.0, 3.0] }]);
/// assert!(svg.starts_with("<svg") && svg.contains("polyline"));
/// ```
pub fn step_latency_svg(title: &str, first_position: usize, series: &[Series]) -> String {
    let steps = series
        .iter()
        .map(|s| s.step_ms.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let max_ms = series
        .iter()
        .flat_map(|s| s.step_ms.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |step: usize| LEFT + plot_w * step as f64 / (steps.saturating_sub(1).max(1)) as f64;
    let y = |ms: f64| TOP + plot_h * (1.0 - ms / max_ms);

    let mut doc = Document::new()
        .set("xmlns", "http://www.w3.org/2000/svg")
        .set("width", WIDTH)
        .set("height", HEIGHT)
        .set("viewBox", (0, 0, WIDTH, HEIGHT))
        .set("font-family", "sans-serif")
        .set("font-size", 12)
        .add(
            Rectangle::new()
                .set("width", WIDTH)
                .set("height", HEIGHT)
                .set("fill", "white"),
        )
        .add(
            text(WIDTH / 2.0, 22.0, title)
                .set("text-anchor", "middle")
                .set("font-size", 15),
        );
    // Axes with five ticks each.
    doc = doc
        .add(line(LEFT, TOP + plot_h, LEFT + plot_w, TOP + plot_h))
        .add(line(LEFT, TOP, LEFT, TOP + plot_h));
    for i in 0..=4 {
        let step = (steps - 1) * i / 4;
        let ms = max_ms * i as f64 / 4.0;
        doc = doc
            .add(
                text(
                    x(step),
                    TOP + plot_h + 18.0,
                    &(first_position + step).to_string(),
                )
                .set("text-anchor", "middle"),
            )
            .add(text(LEFT - 8.0, y(ms) + 4.0, &format!("{ms:.1}")).set("text-anchor", "end"))
            .add(line(LEFT, y(ms), LEFT + plot_w, y(ms)).set("stroke", "#e0e0e0"));
    }
    doc = doc
        .add(
            text(
                LEFT + plot_w / 2.0,
                HEIGHT - 15.0,
                "position of the token fed (prompt + step)",
            )
            .set("text-anchor", "middle"),
        )
        .add(
            text(18.0, TOP + plot_h / 2.0, "ms per decode step")
                .set("text-anchor", "middle")
                .set(
                    "transform",
                    format!("rotate(-90 18 {})", TOP + plot_h / 2.0),
                ),
        );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = s
            .step_ms
            .iter()
            .enumerate()
            .map(|(step, &ms)| format!("{:.1},{:.1}", x(step), y(ms)))
            .collect();
        doc = doc
            .add(
                Polyline::new()
                    .set("points", points.join(" "))
                    .set("fill", "none")
                    .set("stroke", color)
                    .set("stroke-width", 1.5),
            )
            .add(
                line(
                    WIDTH - RIGHT + 15.0,
                    TOP + 10.0 + 20.0 * i as f64,
                    WIDTH - RIGHT + 40.0,
                    TOP + 10.0 + 20.0 * i as f64,
                )
                .set("stroke", color)
                .set("stroke-width", 3),
            )
            .add(text(
                WIDTH - RIGHT + 46.0,
                TOP + 14.0 + 20.0 * i as f64,
                &s.label,
            ));
    }
    doc.to_string()
}

fn line(x1: f64, y1: f64, x2: f64, y2: f64) -> Line {
    Line::new()
        .set("x1", x1)
        .set("y1", y1)
        .set("x2", x2)
        .set("y2", y2)
        .set("stroke", "black")
}

fn text(x: f64, y: f64, content: &str) -> Text {
    Text::new(content).set("x", x).set("y", y)
}
