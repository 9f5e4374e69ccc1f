//! PNG figures: heatmaps with a colour bar and line charts. The font (DejaVu Sans) is
//! compiled in, so titles and labels render the same on every machine.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf32;
use plotters::prelude::*;

use crate::{Error, Result};

/// A matrix drawn as coloured cells, row 0 at the top, with a colour bar.
#[derive(Debug, Clone)]
pub struct Heatmap<'a> {
    /// The title above the figure.
    pub title: &'a str,
    /// What the columns are.
    pub x_label: &'a str,
    /// What the rows are.
    pub y_label: &'a str,
    /// What the colours mean (the colour bar's label).
    pub value_label: &'a str,
    /// The values, one `Vec` per row, all rows of equal length.
    pub rows: &'a [Vec<f32>],
    /// A label per column (for example the tokens of a prompt); column numbers otherwise.
    pub column_names: Option<&'a [String]>,
    /// A label per row, from the top; row numbers otherwise.
    pub row_names: Option<&'a [String]>,
}

/// One named line of a [`LineChart`].
#[derive(Debug, Clone)]
pub struct Line {
    /// The legend entry.
    pub label: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f32, f32)>,
}

/// Lines over a shared x axis, with a legend.
#[derive(Debug, Clone)]
pub struct LineChart<'a> {
    /// The title above the figure.
    pub title: &'a str,
    /// The x axis.
    pub x_label: &'a str,
    /// The y axis.
    pub y_label: &'a str,
    /// The lines.
    pub lines: &'a [Line],
    /// A logarithmic y axis (used only when every value is positive).
    pub log_y: bool,
}

/// What drawing with plotters returns.
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

const SIZE: (u32, u32) = (1100, 800);
const FONT: &str = "sans-serif";
const COLOR_STEPS: usize = 200;

/// Registers the embedded font once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let fonts = [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
        ];
        for (style, bytes) in fonts {
            if plotters::style::register_font(FONT, style, bytes).is_err() {
                tracing::warn!("the embedded DejaVu Sans font could not be registered");
            }
        }
    });
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A tick label without needless decimals (`10`, `2.5`, `0.25`).
fn tick(v: f32) -> String {
    let text = format!("{v:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    match text {
        "-0" => "0".to_string(),
        _ => text.to_string(),
    }
}

/// The smallest and largest finite value (0..1 when there is none).
fn finite_range(values: impl Iterator<Item = f32>) -> (f32, f32) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    match (lo.is_finite(), hi > lo) {
        (true, true) => (lo, hi),
        (true, false) => (lo - 0.5, lo + 0.5),
        _ => (0.0, 1.0),
    }
}

impl Heatmap<'_> {
    /// Draws the heatmap into the PNG file `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let n_rows = self.rows.len();
        let n_cols = self.rows.first().map_or(0, Vec::len);
        if n_rows == 0 || n_cols == 0 || self.rows.iter().any(|r| r.len() != n_cols) {
            return Err(plot_error(path, "a heatmap needs equal, non-empty rows"));
        }
        if self.column_names.is_some_and(|names| names.len() != n_cols) {
            return Err(plot_error(path, "one column name per column is needed"));
        }
        if self.row_names.is_some_and(|names| names.len() != n_rows) {
            return Err(plot_error(path, "one row name per row is needed"));
        }
        register_font();
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        let root = root
            .titled(self.title, (FONT, 30).into_font().style(FontStyle::Bold))
            .map_err(|e| plot_error(path, e))?;
        let (cells, bar) = root.split_horizontally(SIZE.0 - 170);
        let range = finite_range(self.rows.iter().flatten().copied());
        self.draw_cells(&cells, range)
            .map_err(|e| plot_error(path, e))?;
        draw_color_bar(&bar, range, self.value_label).map_err(|e| plot_error(path, e))?;
        root.present().map_err(|e| plot_error(path, e))
    }

    fn draw_cells(
        &self,
        area: &DrawingArea<BitMapBackend<'_>, Shift>,
        (lo, hi): (f32, f32),
    ) -> DrawResult {
        let (n_rows, n_cols) = (self.rows.len() as i32, self.rows[0].len() as i32);
        let mut chart = ChartBuilder::on(area)
            .margin(15)
            .x_label_area_size(60)
            .y_label_area_size(70)
            // A one-value axis would map every cell to one pixel: give it a second value,
            // which the single cell covers (see `edge`) and no label names.
            .build_cartesian_2d(
                (0..(n_cols - 1).max(1)).into_segmented(),
                (0..(n_rows - 1).max(1)).into_segmented(),
            )?;
        let column_label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(c) if *c >= n_cols => String::new(),
            SegmentValue::CenterOf(c) => match self.column_names {
                Some(names) => names.get(*c as usize).cloned().unwrap_or_default(),
                None => c.to_string(),
            },
            _ => String::new(),
        };
        // Row 0 is drawn at the top.
        let row_label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(r) if *r >= n_rows => String::new(),
            SegmentValue::CenterOf(r) => {
                let row = (n_rows - 1 - r) as usize;
                match self.row_names {
                    Some(names) => names.get(row).cloned().unwrap_or_default(),
                    None => row.to_string(),
                }
            }
            _ => String::new(),
        };
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .x_labels(n_cols as usize)
            .y_labels(n_rows as usize)
            .x_label_formatter(&column_label)
            .y_label_formatter(&row_label)
            .axis_desc_style((FONT, 22))
            .label_style((FONT, 15));
        mesh.draw()?;
        let scale = |v: f32| ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
        // The far edge of the last cell is the axis end (exact for a single row or column).
        let edge = |v: i32, n: i32| match v < n {
            true => SegmentValue::Exact(v),
            false => SegmentValue::Last,
        };
        chart.draw_series(self.rows.iter().enumerate().flat_map(|(r, row)| {
            let y = n_rows - 1 - r as i32;
            row.iter().enumerate().map(move |(c, &v)| {
                let c = c as i32;
                let color = match v.is_finite() {
                    true => ViridisRGB.get_color(scale(v)),
                    false => RGBColor(200, 200, 200),
                };
                Rectangle::new(
                    [
                        (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                        (edge(c + 1, n_cols), edge(y + 1, n_rows)),
                    ],
                    color.filled(),
                )
            })
        }))?;
        Ok(())
    }
}

/// A vertical colour bar from `lo` (bottom) to `hi` (top) with tick labels.
fn draw_color_bar(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    (lo, hi): (f32, f32),
    label: &str,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(15)
        .margin_bottom(60)
        .margin_right(10)
        .right_y_label_area_size(110)
        .build_cartesian_2d(0f32..1f32, lo..hi)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(label)
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 15))
        .draw()?;
    let step = (hi - lo) / COLOR_STEPS as f32;
    chart.draw_series((0..COLOR_STEPS).map(|i| {
        let v = lo + step * i as f32;
        Rectangle::new(
            [(0.0, v), (1.0, v + step)],
            ViridisRGB
                .get_color(i as f32 / (COLOR_STEPS - 1) as f32)
                .filled(),
        )
    }))?;
    Ok(())
}

impl LineChart<'_> {
    /// Draws the chart into the PNG file `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let points = || self.lines.iter().flat_map(|l| l.points.iter());
        if points().next().is_none() {
            return Err(plot_error(path, "a line chart needs at least one point"));
        }
        register_font();
        self.draw(path).map_err(|e| plot_error(path, e))
    }

    fn draw(&self, path: &Path) -> DrawResult {
        let finite = |p: &&(f32, f32)| p.0.is_finite() && p.1.is_finite();
        let points = || {
            self.lines
                .iter()
                .flat_map(|l| l.points.iter())
                .filter(finite)
        };
        let (x_lo, x_hi) = finite_range(points().map(|p| p.0));
        let (y_lo, y_hi) = finite_range(points().map(|p| p.1));
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(self.title, (FONT, 30).into_font().style(FontStyle::Bold))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(80);
        match self.log_y && y_lo > 0.0 {
            true => {
                let y = (y_lo / 1.25..y_hi * 1.25).log_scale();
                self.draw_lines(builder.build_cartesian_2d(x_lo..x_hi, y)?)?;
            }
            false => {
                let pad = (y_hi - y_lo) * 0.05;
                let y = (y_lo.min(0.0) - pad)..(y_hi + pad);
                self.draw_lines(builder.build_cartesian_2d(x_lo..x_hi, y)?)?;
            }
        }
        root.present()?;
        Ok(())
    }

    fn draw_lines<'a, Y>(
        &self,
        mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf32, Y>>,
    ) -> DrawResult
    where
        Y: Ranged<ValueType = f32> + ValueFormatter<f32>,
    {
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .axis_desc_style((FONT, 22))
            .label_style((FONT, 16))
            .draw()?;
        for (i, line) in self.lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    line.points
                        .iter()
                        .copied()
                        .filter(|(x, y)| x.is_finite() && y.is_finite()),
                    color.stroke_width(3),
                ))?
                .label(line.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 18))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number of pixels that are not white: labels and cells were drawn.
    fn inked_pixels(path: &Path) -> usize {
        let bytes = std::fs::read(path).unwrap();
        png_pixels(&bytes)
            .chunks(3)
            .filter(|p| p != &[255, 255, 255])
            .count()
    }

    fn png_pixels(bytes: &[u8]) -> Vec<u8> {
        let image = image::load_from_memory(bytes).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), SIZE);
        image.into_raw()
    }

    #[test]
    fn heatmap_writes_a_png_of_the_figure_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heat.png");
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| (0..3).map(|c| (r * 3 + c) as f32).collect())
            .collect();
        Heatmap {
            title: "t",
            x_label: "head",
            y_label: "layer",
            value_label: "score",
            rows: &rows,
            column_names: None,
            row_names: None,
        }
        .save(&path)
        .unwrap();
        assert!(inked_pixels(&path) > 100_000);
    }

    #[test]
    fn a_heatmap_of_one_row_and_one_column_is_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        let rows = vec![vec![0.5f32]];
        Heatmap {
            title: "t",
            x_label: "x",
            y_label: "y",
            value_label: "v",
            rows: &rows,
            column_names: None,
            row_names: None,
        }
        .save(&path)
        .unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        // The single cell fills the middle of the plotting area.
        let (w, h) = image.dimensions();
        let centre = image.get_pixel(w * 2 / 5, h / 2).0;
        assert_ne!(centre, [255, 255, 255]);
    }

    #[test]
    fn heatmap_rejects_ragged_rows_and_wrong_column_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        let ragged = vec![vec![1.0, 2.0], vec![3.0]];
        let mut map = Heatmap {
            title: "t",
            x_label: "x",
            y_label: "y",
            value_label: "v",
            rows: &ragged,
            column_names: None,
            row_names: None,
        };
        assert!(map.save(&path).unwrap_err().to_string().contains("equal"));
        let rows = vec![vec![1.0, 2.0]];
        let names = vec!["a".to_string()];
        map.rows = &rows;
        map.column_names = Some(&names);
        assert!(
            map.save(&path)
                .unwrap_err()
                .to_string()
                .contains("column name")
        );
        assert!(!path.exists());
    }

    #[test]
    fn ticks_drop_needless_decimals() {
        assert_eq!(tick(10.0), "10");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(-0.0001), "0");
        assert_eq!(tick(0.125), "0.125");
    }

    #[test]
    fn line_chart_draws_lines_and_rejects_no_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.png");
        let lines = vec![Line {
            label: "a".into(),
            points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, f32::NAN)],
        }];
        LineChart {
            title: "t",
            x_label: "x",
            y_label: "y",
            lines: &lines,
            log_y: true,
        }
        .save(&path)
        .unwrap();
        assert!(inked_pixels(&path) > 1_000);
        let empty = LineChart {
            title: "t",
            x_label: "x",
            y_label: "y",
            lines: &[],
            log_y: false,
        };
        assert!(empty.save(&dir.path().join("e.png")).is_err());
    }
}
