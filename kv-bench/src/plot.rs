//! Line charts as SVG: the step-latency plot of `compare` and the throughput plot of `sweep`.

use svg::node::element::{Line, Polyline, Rectangle, Text};
use svg::Document;

/// One line of a chart: a label and one value per x.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// The line's values, one per x (a shorter series stops early).
    pub values: Vec<f64>,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// The step-latency plot: milliseconds per decode step (`values`) against the position of the
/// token fed, starting at `first_position`. A cached line stays flat; an uncached one climbs.
///
/// ```
/// use kv_bench::plot::{step_latency_svg, Series};
///
/// let svg = step_latency_svg("demo", 10, &[Series { label: "none".into(), values: vec![1.0, 2.0, 3.0] }]);
/// assert!(svg.starts_with("<svg") && svg.contains("polyline"));
/// ```
pub fn step_latency_svg(title: &str, first_position: usize, series: &[Series]) -> String {
    let steps = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let xs: Vec<f64> = (0..steps).map(|i| (first_position + i) as f64).collect();
    chart(
        title,
        "position of the token fed (prompt + step)",
        "ms per decode step",
        &xs,
        series,
    )
}

/// A line chart of `series` over `xs` (increasing), as an SVG document.
pub fn chart(title: &str, x_label: &str, y_label: &str, xs: &[f64], series: &[Series]) -> String {
    let (x_min, x_max) = match (xs.first(), xs.last()) {
        (Some(&a), Some(&b)) if b > a => (a, b),
        (Some(&a), _) => (a, a + 1.0),
        _ => (0.0, 1.0),
    };
    let max_y = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |v: f64| LEFT + plot_w * (v - x_min) / (x_max - x_min);
    let y = |v: f64| TOP + plot_h * (1.0 - v / max_y);

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
        )
        .add(line(LEFT, TOP + plot_h, LEFT + plot_w, TOP + plot_h))
        .add(line(LEFT, TOP, LEFT, TOP + plot_h));
    for i in 0..=4 {
        let xv = x_min + (x_max - x_min) * i as f64 / 4.0;
        let yv = max_y * i as f64 / 4.0;
        doc = doc
            .add(text(x(xv), TOP + plot_h + 18.0, &format!("{xv:.0}")).set("text-anchor", "middle"))
            .add(text(LEFT - 8.0, y(yv) + 4.0, &format!("{yv:.1}")).set("text-anchor", "end"))
            .add(line(LEFT, y(yv), LEFT + plot_w, y(yv)).set("stroke", "#e0e0e0"));
    }
    doc = doc
        .add(text(LEFT + plot_w / 2.0, HEIGHT - 15.0, x_label).set("text-anchor", "middle"))
        .add(
            text(18.0, TOP + plot_h / 2.0, y_label)
                .set("text-anchor", "middle")
                .set(
                    "transform",
                    format!("rotate(-90 18 {})", TOP + plot_h / 2.0),
                ),
        );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = xs
            .iter()
            .zip(&s.values)
            .filter(|(_, v)| v.is_finite())
            .map(|(&xv, &v)| format!("{:.1},{:.1}", x(xv), y(v)))
            .collect();
        let legend_y = TOP + 10.0 + 20.0 * i as f64;
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
                    legend_y,
                    WIDTH - RIGHT + 40.0,
                    legend_y,
                )
                .set("stroke", color)
                .set("stroke-width", 3),
            )
            .add(text(WIDTH - RIGHT + 46.0, legend_y + 4.0, &s.label));
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
