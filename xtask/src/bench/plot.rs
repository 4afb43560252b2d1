//! The bench's SVG plots: plain series of (x, y) in, an SVG file of line charts out.
//!
//! Drawn with `plotters`' SVG backend and no font feature: text goes into the file as
//! `<text>` elements that the viewer lays out (plotters only estimates its width to place
//! the labels), so no font stack is built or read. A figure is one or more charts stacked
//! vertically, each with a title, both axes labelled with their units, and a legend.
//!
//! [`buckets`] turns per-request samples (offset since the phase start, value) into
//! per-second counts and percentiles, the series the ingress plot draws.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use super::report;

/// Width of a figure, in pixels.
const WIDTH: u32 = 960;
/// Height of each chart in a figure, in pixels.
const CHART_HEIGHT: u32 = 400;
/// Room above the largest y value, as a share of the range, per series and in all: the
/// legend sits there, above the lines.
const LEGEND_ROOM_PER_SERIES: f64 = 0.1;
const LEGEND_ROOM: f64 = 0.15;
/// Series with at most this many points get a marker at each point.
const MARKERS_UP_TO: usize = 40;
/// One color per series, in order (the Tableau 10 palette's first ones).
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One named line.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// Points in drawing order; non-finite ones are left out.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// One chart: a title, axis labels (with units) and its lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

impl Chart {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
        series: Vec<Series>,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
        }
    }
}

/// What a scenario plots: the file name (in the `--out` folder) and its charts, top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub file: &'static str,
    pub charts: Vec<Chart>,
}

/// The samples of one bucket of [`buckets`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// The bucket's start, in seconds since the phase start.
    pub start_s: f64,
    /// How many samples fell in it.
    pub count: usize,
    /// Nearest-rank percentiles and the largest value; NaN in an empty bucket.
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Groups `samples` of (seconds since the phase start, value) into consecutive buckets of
/// `width_s` seconds from 0 up to the last sample's, empty ones included (count 0, NaN
/// percentiles). A sample before 0 counts in the first bucket.
pub fn buckets(samples: &[(f64, f64)], width_s: f64) -> Vec<Bucket> {
    let index = |at: f64| (at.max(0.0) / width_s).floor() as usize;
    let Some(last) = samples.iter().map(|&(at, _)| index(at)).max() else {
        return Vec::new();
    };
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); last + 1];
    for &(at, value) in samples {
        values[index(at)].push(value);
    }
    values
        .into_iter()
        .enumerate()
        .map(|(n, values)| {
            let sorted = report::sorted(values);
            Bucket {
                start_s: n as f64 * width_s,
                count: sorted.len(),
                p50: report::percentile(&sorted, 50.0),
                p99: report::percentile(&sorted, 99.0),
                max: report::percentile(&sorted, 100.0),
            }
        })
        .collect()
}

/// Per bucket, at its middle: `value(bucket)`.
pub fn bucket_series(
    name: impl Into<String>,
    buckets: &[Bucket],
    width_s: f64,
    value: impl Fn(&Bucket) -> f64,
) -> Series {
    Series::new(
        name,
        buckets
            .iter()
            .map(|b| (b.start_s + width_s / 2.0, value(b)))
            .collect(),
    )
}

/// Writes `figure` as an SVG file at `path`.
pub fn write(path: &Path, figure: &Figure) -> anyhow::Result<()> {
    let svg = render(&figure.charts)?;
    std::fs::write(path, svg).map_err(|err| anyhow!("write {}: {err}", path.display()))
}

/// The SVG document of `charts`, stacked top to bottom.
pub fn render(charts: &[Chart]) -> anyhow::Result<String> {
    let rows = u32::try_from(charts.len().max(1))?;
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, CHART_HEIGHT * rows)).into_drawing_area();
        root.fill(&WHITE).map_err(|err| anyhow!("plot: {err}"))?;
        let areas = root.split_evenly((charts.len().max(1), 1));
        for (chart, area) in charts.iter().zip(&areas) {
            draw(chart, area).map_err(|err| anyhow!("plot {}: {err}", chart.title))?;
        }
        root.present().map_err(|err| anyhow!("plot: {err}"))?;
    }
    Ok(svg)
}

/// The finite points of `series`.
fn finite(series: &Series) -> Vec<(f64, f64)> {
    series
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// Both ranges from 0 (or below, for negative values) to the largest finite value, y with
/// room above the lines for the legend; a range that would be empty is widened.
fn ranges(chart: &Chart) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points: Vec<(f64, f64)> = chart.series.iter().flat_map(finite).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (0.0_f64, f64::NEG_INFINITY, 0.0_f64, 0.0_f64);
    for &(x, y) in &points {
        (x0, x1) = (x0.min(x), x1.max(x));
        (y0, y1) = (y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let room = LEGEND_ROOM + LEGEND_ROOM_PER_SERIES * chart.series.len() as f64;
    (x0..x1, y0..y1 + (y1 - y0) * room)
}

/// A tick label: whole numbers from 100 up, else at most two decimals, no trailing zeros.
fn tick(value: &f64) -> String {
    if value.abs() >= 100.0 {
        return format!("{value:.0}");
    }
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0" } else { text }.to_owned()
}

fn draw<DB: DrawingBackend>(
    chart: &Chart,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x_range, y_range) = ranges(chart);
    let mut context = ChartBuilder::on(area)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(14)
        // room for the last x tick label, centred on the right edge
        .margin_right(36)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range, y_range)?;
    context
        .configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_labels(12)
        .y_labels(8)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .light_line_style(RGBColor(235, 235, 235))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (n, series) in chart.series.iter().enumerate() {
        let color = COLORS[n % COLORS.len()];
        let points = finite(series);
        let markers = if points.len() <= MARKERS_UP_TO { 3 } else { 0 };
        context
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(markers))?
            .label(series.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    if !chart.series.is_empty() {
        context
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_request_samples_become_per_second_counts_and_percentiles() {
        // Second 0: latencies 1..=100 ms; second 1: none; second 2: 5 and 7 ms, one of
        // them exactly on the bucket's start; a sample before the start counts in second 0.
        let mut samples: Vec<(f64, f64)> = (1..=100)
            .map(|ms| (f64::from(ms) / 101.0, f64::from(ms)))
            .collect();
        samples.extend([(2.0, 7.0), (2.9, 5.0), (-0.01, 50.5)]);
        let buckets = buckets(&samples, 1.0);
        assert_eq!(buckets.len(), 3);
        assert_eq!(
            (buckets[0].start_s, buckets[0].count),
            (0.0, 101),
            "the early sample counts in the first second"
        );
        assert_eq!(buckets[0].p50, 50.5);
        assert_eq!(buckets[0].p99, 99.0);
        assert_eq!(buckets[0].max, 100.0);
        assert_eq!((buckets[1].start_s, buckets[1].count), (1.0, 0));
        assert!(buckets[1].p50.is_nan() && buckets[1].max.is_nan());
        assert_eq!(
            (buckets[2].count, buckets[2].p50, buckets[2].max),
            (2, 7.0, 7.0)
        );
        assert_eq!(buckets[2].p99, 7.0);

        let throughput = bucket_series("accepted", &buckets, 1.0, |b| b.count as f64);
        assert_eq!(throughput.points, [(0.5, 101.0), (1.5, 0.0), (2.5, 2.0)]);
        // Half-second buckets: twice as many, the rate is count / width.
        let halves = super::buckets(&samples, 0.5);
        assert_eq!(halves.len(), 6);
        assert_eq!(halves[4].start_s, 2.0);
        assert!(super::buckets(&[], 1.0).is_empty());
    }

    fn figure() -> Figure {
        Figure {
            file: "test.svg",
            charts: vec![
                Chart::new(
                    "Throughput",
                    "time since the load started (s)",
                    "callbacks/s",
                    vec![Series::new(
                        "accepted",
                        vec![(0.5, 9_000.0), (1.5, 11_000.0), (2.5, 10_500.0)],
                    )],
                ),
                Chart::new(
                    "Ack latency",
                    "time since the load started (s)",
                    "latency (ms)",
                    vec![
                        Series::new("p50", vec![(0.5, 2.0), (1.5, f64::NAN), (2.5, 3.0)]),
                        Series::new("p99 <&>", vec![(0.5, 9.0), (2.5, 12.0)]),
                    ],
                ),
            ],
        }
    }

    #[test]
    fn the_svg_file_has_titles_axis_labels_legend_and_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.svg");
        write(&path, &figure()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "Throughput",
            "Ack latency",
            "time since the load started (s)",
            "callbacks/s",
            "latency (ms)",
            "accepted",
            "p50",
            "p99 &lt;&amp;&gt;",
        ] {
            // plotters writes each text on a line of its own inside its element
            assert!(
                svg.contains(&format!(">\n{text}\n</text>")),
                "no <text> element {text} in the SVG"
            );
        }
        // One line per series (the NaN point is left out, not drawn), plus the legend's.
        let lines = svg.matches("<polyline").count() + svg.matches("<path").count();
        assert!(lines >= 3, "{lines} lines in the SVG");
        assert!(!svg.contains("NaN"), "non-finite points are not drawn");
        // Markers on short series.
        assert!(svg.contains("<circle"));
    }

    #[test]
    fn empty_and_flat_series_still_draw_a_chart() {
        let svg = render(&[
            Chart::new(
                "nothing",
                "x (s)",
                "y (MB)",
                vec![Series::new("none", vec![])],
            ),
            Chart::new(
                "flat",
                "x (s)",
                "fds",
                vec![Series::new("open fds", vec![(5.0, 0.0), (5.0, 0.0)])],
            ),
        ])
        .unwrap();
        assert!(svg.contains("nothing") && svg.contains("flat") && svg.contains("open fds"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let (x, y) = ranges(&Chart::new(
            "flat",
            "",
            "",
            vec![Series::new("a", vec![(5.0, 0.0)])],
        ));
        assert_eq!((x.start, x.end), (0.0, 5.0), "axes start at 0");
        assert!(y.start == 0.0 && y.end > 1.0);
        let (x, _) = ranges(&Chart::new(
            "one point at 0",
            "",
            "",
            vec![Series::new("a", vec![(0.0, 0.0)])],
        ));
        assert_eq!((x.start, x.end), (0.0, 1.0));
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick(&20_000.0), "20000");
        assert_eq!(tick(&0.30000000000000004), "0.3");
        assert_eq!(tick(&2.0), "2");
        assert_eq!(tick(&12.5), "12.5");
        assert_eq!(tick(&-0.001), "0");
    }
}
