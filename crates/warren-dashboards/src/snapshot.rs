//! Dashboard panels drawn to one PNG, without Grafana: a grid of line
//! charts, two per row, each with the panel's title, its series in the
//! palette below and a legend. Text is drawn from a TrueType file loaded at
//! run time (Debian's `fonts-dejavu-core` by default), so no fontconfig or
//! system font lookup is involved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::dashboard::{Dashboard, expand, legend};
use crate::prometheus::{ApiError, PrometheusApi};

/// Where Debian's `fonts-dejavu-core` puts its sans-serif face.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// Pixels of one panel.
pub const CELL_WIDTH: u32 = 640;
pub const CELL_HEIGHT: u32 = 320;
/// Panels per row.
pub const COLUMNS: u32 = 2;
/// Series colours, in order (saturated, so [`inspect_png`] can tell plotted
/// lines from text and axes).
pub const PALETTE: [(u8, u8, u8); 6] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (23, 190, 207),
];

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "cannot read the font {path}: {source} (install fonts-dejavu-core or pass another TTF)"
    )]
    Font {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable TrueType font")]
    BadFont { path: PathBuf },
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("reading {path}: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("nothing to draw")]
    Empty,
}

/// One series of a panel.
#[derive(Debug, Clone)]
pub struct PlotSeries {
    pub legend: String,
    /// (seconds since the start of the window, value); NaN values are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One panel to draw.
#[derive(Debug, Clone)]
pub struct PlotPanel {
    pub title: String,
    pub unit: String,
    pub series: Vec<PlotSeries>,
}

/// The overview's main panels (traffic in, depth per queue, workers desired
/// vs current, job duration, refusals by reason, broker health): what
/// `make dashboard-snapshot` draws.
pub const OVERVIEW_MAIN_PANELS: [u32; 6] = [1, 2, 3, 4, 5, 6];

/// Runs the range queries of `dashboard`'s panels `ids` (variables from
/// `values`, `$__rate_interval` as `interval`) from `start` to `end` (unix
/// seconds) and returns them ready to draw, times relative to `start`.
pub async fn collect_panels(
    api: &PrometheusApi,
    dashboard: &Dashboard,
    ids: &[u32],
    values: &BTreeMap<String, String>,
    interval: &str,
    (start, end, step): (f64, f64, f64),
) -> Result<Vec<PlotPanel>, ApiError> {
    let mut panels = Vec::new();
    for id in ids {
        let Some(panel) = dashboard.panels.iter().find(|p| p.id == *id) else {
            continue;
        };
        let mut series = Vec::new();
        for target in &panel.targets {
            let expr = expand(&target.expr, values, interval);
            for found in api.query_range(&expr, start, end, step).await? {
                series.push(PlotSeries {
                    legend: legend(target.legend_format.as_deref(), &found.labels),
                    points: found.points.iter().map(|&(t, v)| (t - start, v)).collect(),
                });
            }
        }
        panels.push(PlotPanel {
            title: panel.title.clone(),
            unit: panel.unit().to_string(),
            series,
        });
    }
    Ok(panels)
}

/// Size of the picture for `panels` panels.
pub fn picture_size(panels: usize) -> (u32, u32) {
    let rows = (panels as u32).div_ceil(COLUMNS);
    (CELL_WIDTH * COLUMNS, CELL_HEIGHT * rows.max(1))
}

static FONT_LOADED: OnceLock<Result<(), String>> = OnceLock::new();

fn load_font(path: &Path) -> Result<(), SnapshotError> {
    let result = FONT_LOADED.get_or_init(|| {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) => return Err(format!("io:{err}")),
        };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "bad".to_string())
    });
    match result {
        Ok(()) => Ok(()),
        Err(message) if message.starts_with("io:") => Err(SnapshotError::Font {
            path: path.to_path_buf(),
            source: std::io::Error::other(message.trim_start_matches("io:").to_string()),
        }),
        Err(_) => Err(SnapshotError::BadFont {
            path: path.to_path_buf(),
        }),
    }
}

/// Draws `panels` to a PNG at `out`, using the TrueType font at `font`.
pub fn render_png(out: &Path, panels: &[PlotPanel], font: &Path) -> Result<(), SnapshotError> {
    if panels.is_empty() {
        return Err(SnapshotError::Empty);
    }
    load_font(font)?;
    let draw_err = |e: &dyn std::fmt::Display| SnapshotError::Draw {
        path: out.to_path_buf(),
        message: e.to_string(),
    };
    let size = picture_size(panels.len());
    let root = BitMapBackend::new(out, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let rows = (panels.len() as u32).div_ceil(COLUMNS) as usize;
    let cells = root.split_evenly((rows, COLUMNS as usize));
    for (panel, cell) in panels.iter().zip(cells.iter()) {
        draw_panel(cell, panel).map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(
    cell: &Area<'_>,
    panel: &PlotPanel,
) -> Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>> {
    let finite = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(t, v)| t.is_finite() && v.is_finite())
    };
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, 0.0f64, 0.0f64);
    for &(t, v) in finite() {
        x_max = x_max.max(t);
        y_min = y_min.min(v);
        y_max = y_max.max(v);
    }
    if (y_max - y_min).abs() < f64::EPSILON {
        y_max = y_min + 1.0;
    }
    let y_max = y_max + (y_max - y_min) * 0.1;
    let title = if panel.unit.is_empty() || panel.unit == "short" {
        panel.title.clone()
    } else {
        format!("{} ({})", panel.title, panel.unit)
    };
    let cell = cell.margin(6, 6, 8, 8);
    let mut chart = ChartBuilder::on(&cell)
        .caption(title, ("sans-serif", 17))
        .x_label_area_size(22)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc("seconds")
        .x_labels(6)
        .y_labels(5)
        .label_style(("sans-serif", 11))
        .draw()?;
    for (i, series) in panel.series.iter().enumerate() {
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        let color = RGBColor(r, g, b);
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .copied()
            .filter(|(t, v)| t.is_finite() && v.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(series.legend.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    if !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 11))
            .draw()?;
    }
    Ok(())
}

/// What [`inspect_png`] found in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PngSummary {
    pub width: u32,
    pub height: u32,
    /// Panels (grid cells of [`CELL_WIDTH`]×[`CELL_HEIGHT`]) holding plotted
    /// lines: at least 100 pixels in a palette colour.
    pub plotted_panels: usize,
}

/// Decodes a snapshot and counts the grid cells with plotted data.
pub fn inspect_png(path: &Path) -> Result<PngSummary, SnapshotError> {
    let decode_err = |message: String| SnapshotError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| decode_err(e.to_string()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| decode_err(e.to_string()))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| decode_err(e.to_string()))?;
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => return Err(decode_err(format!("unexpected colour type {other:?}"))),
    };
    let (width, height) = (info.width, info.height);
    let columns = (width / CELL_WIDTH).max(1);
    let rows = (height / CELL_HEIGHT).max(1);
    let mut counts = vec![0usize; (columns * rows) as usize];
    for y in 0..height {
        for x in 0..width {
            let at = ((y * width + x) as usize) * channels;
            let (r, g, b) = (buf[at], buf[at + 1], buf[at + 2]);
            let in_palette = PALETTE.iter().any(|&(pr, pg, pb)| {
                r.abs_diff(pr) < 12 && g.abs_diff(pg) < 12 && b.abs_diff(pb) < 12
            });
            if in_palette {
                let cell = ((y / CELL_HEIGHT).min(rows - 1) * columns
                    + (x / CELL_WIDTH).min(columns - 1)) as usize;
                counts[cell] += 1;
            }
        }
    }
    Ok(PngSummary {
        width,
        height,
        plotted_panels: counts.iter().filter(|&&n| n >= 100).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel(title: &str, with_data: bool) -> PlotPanel {
        PlotPanel {
            title: title.into(),
            unit: "reqps".into(),
            series: if with_data {
                vec![
                    PlotSeries {
                        legend: "accepted".into(),
                        points: (0..60)
                            .map(|t| (t as f64, (t as f64 / 6.0).sin() + 1.0))
                            .collect(),
                    },
                    PlotSeries {
                        legend: "nan".into(),
                        points: vec![(0.0, f64::NAN), (1.0, 2.0), (30.0, 3.0)],
                    },
                ]
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn panels_with_data_are_drawn_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.png");
        let panels = vec![panel("a", true), panel("b", false), panel("c", true)];
        render_png(&out, &panels, Path::new(DEFAULT_FONT)).unwrap();
        let summary = inspect_png(&out).unwrap();
        assert_eq!((summary.width, summary.height), picture_size(3));
        assert_eq!(summary.plotted_panels, 2, "the empty panel has no line");
    }
}
