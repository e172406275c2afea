//! Training plots as PNG files: accuracy and loss curves, the unfreezing timeline, the learning-rate schedule
//! (log scale), the row-normalized confusion matrix and per-class F1.
//!
//! Text is drawn with DejaVu Sans, embedded in the binary (Bitstream Vera license, see
//! `assets/fonts/LICENSE-DejaVu.txt`), so no system font is needed. Each image is rendered into memory, encoded
//! as PNG and written atomically.

use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::history::{History, write_atomic};
use super::metrics::Report;

/// The embedded font (DejaVu Sans 2.37).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Font family name the plots use.
const FONT: &str = "sans-serif";

const LINE_W: (u32, u32) = (1000, 620);

/// Series colours (colour-blind friendly: Okabe–Ito).
const BLUE: RGBColor = RGBColor(0, 114, 178);
const ORANGE: RGBColor = RGBColor(230, 159, 0);
const GREEN: RGBColor = RGBColor(0, 158, 115);
const VERMILLION: RGBColor = RGBColor(213, 94, 0);
const GREY: RGBColor = RGBColor(150, 150, 150);

/// Registers the embedded font with plotters (once per process).
pub fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, DEJAVU_SANS).is_ok()
    });
    if ok { Ok(()) } else { bail!("the embedded DejaVu Sans font could not be loaded") }
}

fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot drawing failed: {e}")
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Renders into memory with `draw`, encodes PNG, writes `path` atomically.
fn render_png(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> Result<()>) -> Result<()> {
    register_font()?;
    let (w, h) = size;
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        draw(&root).with_context(|| format!("cannot draw {}", path.display()))?;
        root.present().map_err(pe)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer has the wrong size")?;
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).with_context(|| format!("cannot encode {}", path.display()))?;
    write_atomic(path, &out.into_inner())
}

/// A named line.
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

fn finite_points(h: &History, f: impl Fn(&super::history::EpochRecord) -> f64) -> Vec<(f64, f64)> {
    h.epochs.iter().map(|r| (r.epoch as f64, f(r))).filter(|p| p.1.is_finite()).collect()
}

/// x range covering the epochs, padded so single-epoch histories still draw.
fn epoch_range(h: &History) -> Range<f64> {
    let first = h.epochs.first().map_or(0.0, |r| r.epoch as f64);
    let last = h.epochs.last().map_or(1.0, |r| r.epoch as f64);
    if last > first { first..last } else { first - 0.5..first + 0.5 }
}

/// How many x labels to ask for: one per epoch up to 20 (beyond that the axis picks round numbers).
fn epoch_ticks(h: &History) -> usize {
    h.epochs.len().clamp(2, 20)
}

/// Epochs are whole numbers: ticks between them stay unlabelled (never "2 2 2").
fn epoch_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() }
}

/// y range covering the series with 5% margins.
fn value_range(series: &[Series], floor: Option<f64>, ceil: Option<f64>) -> Range<f64> {
    let vals = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.05 * lo.abs().max(1.0) };
    let mut r = (lo - pad)..(hi + pad);
    if let Some(f) = floor {
        r.start = r.start.max(f);
    }
    if let Some(c) = ceil {
        r.end = r.end.min(c);
    }
    r
}

/// Epochs where the frozen-block count changes (stage transitions).
fn transitions(h: &History) -> Vec<(f64, usize, usize)> {
    h.epochs
        .windows(2)
        .filter(|w| w[0].frozen_layers != w[1].frozen_layers)
        .map(|w| (w[1].epoch as f64, w[0].frozen_layers, w[1].frozen_layers))
        .collect()
}

/// How a per-epoch line chart is labelled.
struct LineStyle<'a> {
    title: &'a str,
    y_desc: &'a str,
    /// Y values are fractions shown as percentages.
    percent: bool,
    legend: SeriesLabelPosition,
    /// Dashed vertical lines where the unfreezing stage changes.
    mark_transitions: bool,
}

fn line_chart(
    area: &Area<'_>,
    style: LineStyle<'_>,
    h: &History,
    series: &[Series],
    y_range: Range<f64>,
) -> Result<()> {
    let LineStyle { title, y_desc, percent, legend, mark_transitions } = style;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 28))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(78)
        .build_cartesian_2d(epoch_range(h), y_range.clone())
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 16))
        .x_labels(epoch_ticks(h))
        .x_label_formatter(&epoch_label)
        .y_label_formatter(&|y| if percent { format!("{:.0}%", y * 100.0) } else { format!("{y:.3}") })
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(pe)?;
    for (epoch, from, to) in transitions(h).into_iter().filter(|_| mark_transitions) {
        let style = GREY.stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(vec![(epoch, y_range.start), (epoch, y_range.end)], 6, 4, style))
            .map_err(pe)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{from}→{to} frozen"),
                (epoch, y_range.end),
                (FONT, 14).into_font().color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Left, VPos::Top)),
            )))
            .map_err(pe)?;
    }
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(3)))
            .map_err(pe)?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 18))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(pe)?;
    Ok(())
}

fn check_history(h: &History) -> Result<()> {
    if h.epochs.is_empty() {
        bail!("the history has no epochs to plot");
    }
    Ok(())
}

/// Train and validation accuracy (and validation balanced accuracy) per epoch.
pub fn plot_accuracy(h: &History, path: &Path) -> Result<()> {
    check_history(h)?;
    let series = vec![
        Series { label: "train accuracy".into(), color: BLUE, points: finite_points(h, |r| r.train_acc) },
        Series { label: "val accuracy".into(), color: ORANGE, points: finite_points(h, |r| r.val_acc) },
        Series {
            label: "val balanced accuracy".into(),
            color: GREEN,
            points: finite_points(h, |r| r.val_balanced_acc),
        },
    ];
    let range = value_range(&series, Some(0.0), Some(1.0));
    let style = LineStyle {
        title: "Accuracy",
        y_desc: "accuracy",
        percent: true,
        legend: SeriesLabelPosition::LowerRight,
        mark_transitions: true,
    };
    render_png(path, LINE_W, |a| line_chart(a, style, h, &series, range))
}

/// Train and validation loss per epoch.
pub fn plot_loss(h: &History, path: &Path) -> Result<()> {
    check_history(h)?;
    let series = vec![
        Series { label: "train loss".into(), color: BLUE, points: finite_points(h, |r| r.train_loss) },
        Series { label: "val loss".into(), color: ORANGE, points: finite_points(h, |r| r.val_loss) },
    ];
    let range = value_range(&series, Some(0.0), None);
    // Loss decreases: the legend goes top right.
    let style = LineStyle {
        title: "Loss",
        y_desc: "loss",
        percent: false,
        legend: SeriesLabelPosition::UpperRight,
        mark_transitions: false,
    };
    render_png(path, LINE_W, |a| line_chart(a, style, h, &series, range))
}

/// Frozen `features` blocks (top) and backbone learning-rate multiplier (bottom) per epoch.
pub fn plot_unfreezing(h: &History, path: &Path) -> Result<()> {
    check_history(h)?;
    render_png(path, (1000, 760), |root| {
        let root = root.titled("Gradual unfreezing", (FONT, 28)).map_err(pe)?;
        let (top, bottom) = root.split_vertically(340);
        let frozen = finite_points(h, |r| r.frozen_layers as f64);
        let mut c = ChartBuilder::on(&top)
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(78)
            .build_cartesian_2d(epoch_range(h), -0.3f64..9.3)
            .map_err(pe)?;
        c.configure_mesh()
            .x_desc("epoch")
            .y_desc("frozen blocks")
            .axis_desc_style((FONT, 20))
            .label_style((FONT, 16))
            .x_labels(epoch_ticks(h))
            .x_label_formatter(&epoch_label)
            .y_labels(10)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(pe)?;
        c.draw_series(LineSeries::new(step_points(&frozen), VERMILLION.stroke_width(3))).map_err(pe)?;
        let mult = finite_points(h, |r| r.lr_multiplier);
        let hi = mult.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
        let mut c = ChartBuilder::on(&bottom)
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(78)
            .build_cartesian_2d(epoch_range(h), 0.0f64..hi)
            .map_err(pe)?;
        c.configure_mesh()
            .x_desc("epoch")
            .y_desc("backbone LR multiplier")
            .axis_desc_style((FONT, 20))
            .label_style((FONT, 16))
            .x_labels(epoch_ticks(h))
            .x_label_formatter(&epoch_label)
            .y_label_formatter(&|y| format!("{y:.2}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(pe)?;
        c.draw_series(LineSeries::new(step_points(&mult), BLUE.stroke_width(3))).map_err(pe)?;
        Ok(())
    })
}

/// Points of a step function: each value holds until the next epoch.
fn step_points(p: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(p.len() * 2);
    for (i, &(x, y)) in p.iter().enumerate() {
        if i > 0 {
            out.push((x, p[i - 1].1));
        }
        out.push((x, y));
    }
    out
}

/// Head and backbone learning rates per epoch, log scale. The head is a thick solid line with dots, the backbone
/// a thinner dashed line with squares on top of it, so both stay visible where they coincide.
pub fn plot_lr(h: &History, path: &Path) -> Result<()> {
    check_history(h)?;
    let head = finite_points(h, |r| r.lr);
    let back = finite_points(h, |r| r.lr * r.lr_multiplier);
    let pos = head.iter().chain(&back).map(|p| p.1).filter(|v| *v > 0.0);
    let (lo, hi) = pos.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo.is_finite() { (lo / 1.5, hi * 1.5) } else { (1e-7, 1e-3) };
    let ticks = log_ticks(lo, hi);
    render_png(path, LINE_W, |a| {
        let mut chart = ChartBuilder::on(a)
            .caption("Learning rate", (FONT, 28))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(92)
            .build_cartesian_2d(epoch_range(h), (lo..hi).log_scale().with_key_points(ticks.clone()))
            .map_err(pe)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("learning rate (log scale)")
            .y_labels(ticks.len())
            .axis_desc_style((FONT, 20))
            .label_style((FONT, 16))
            .x_labels(epoch_ticks(h))
            .x_label_formatter(&epoch_label)
            .y_label_formatter(&log_label)
            .light_line_style(WHITE)
            .draw()
            .map_err(pe)?;
        let positive = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> { pts.iter().copied().filter(|p| p.1 > 0.0).collect() };
        let head_style = BLUE.stroke_width(5);
        chart
            .draw_series(LineSeries::new(positive(&step_points(&head)), head_style))
            .map_err(pe)?
            .label("head LR")
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (28, 0)], head_style)
                    + Circle::new((14, 0), 5, BLUE.filled())
            });
        chart.draw_series(positive(&head).into_iter().map(|p| Circle::new(p, 5, BLUE.filled()))).map_err(pe)?;
        let back_style = VERMILLION.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(positive(&step_points(&back)), 10, 6, back_style))
            .map_err(pe)?
            .label("backbone LR (head × stage multiplier)")
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (10, 0)], back_style)
                    + PathElement::new(vec![(18, 0), (28, 0)], back_style)
                    + Rectangle::new([(10, -4), (18, 4)], VERMILLION.filled())
            });
        chart
            .draw_series(
                positive(&back)
                    .into_iter()
                    .map(|(x, y)| EmptyElement::at((x, y)) + Rectangle::new([(-4, -4), (4, 4)], VERMILLION.filled())),
            )
            .map_err(pe)?;
        chart
            .configure_series_labels()
            .label_font((FONT, 18))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            // Learning rates only fall: the lower left stays free.
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(pe)?;
        Ok(())
    })
}

/// Tick values for a log axis over `lo..hi`: 1, 2 and 5 times each power of ten inside it, or every integer
/// multiple when that gives fewer than three; the ends of the range when even that finds fewer than two.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let in_range = |mantissas: &[f64]| -> Vec<f64> {
        let mut out = Vec::new();
        let mut exp = lo.log10().floor() as i32;
        while 10f64.powi(exp) <= hi {
            for &m in mantissas {
                let v = m * 10f64.powi(exp);
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
            exp += 1;
        }
        out
    };
    let coarse = in_range(&[1.0, 2.0, 5.0]);
    if coarse.len() >= 3 {
        return coarse;
    }
    let fine = in_range(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    if fine.len() >= 2 { fine } else { vec![lo, hi] }
}

/// A log-axis label: `5e-4`, `1e-3`, or three significant digits for a value off the 1–9 × 10^k grid.
fn log_label(y: &f64) -> String {
    if *y <= 0.0 {
        return String::new();
    }
    let exp = y.log10().floor();
    let mantissa = y / 10f64.powf(exp);
    let m = mantissa.round();
    if (mantissa - m).abs() < 1e-6 { format!("{m:.0}e{exp:.0}") } else { format!("{y:.2e}") }
}

fn names_for(report: &Report, class_names: &[String]) -> Vec<String> {
    (0..report.num_classes).map(|i| class_names.get(i).cloned().unwrap_or_else(|| format!("class {i}"))).collect()
}

/// White → blue colour ramp for a value in [0, 1].
fn heat(v: f64) -> RGBColor {
    let t = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

/// Row-normalized confusion matrix heatmap with class names and the value in each cell.
pub fn plot_confusion(report: &Report, class_names: &[String], path: &Path) -> Result<()> {
    let c = report.num_classes;
    if c == 0 {
        bail!("the report has no classes to plot");
    }
    if c > 64 || report.confusion_normalized.len() != c {
        bail!("cannot draw a confusion heatmap for {c} classes (at most 64, with a C×C matrix)");
    }
    let names = names_for(report, class_names);
    let cell: i32 = (620 / c as i32).clamp(36, 110);
    let left = 170i32;
    let top = 70i32;
    let grid = cell * c as i32;
    let size = ((left + grid + 110) as u32, (top + grid + 80) as u32);
    render_png(path, size, |root| {
        let title = (FONT, 28).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new("Confusion matrix (rows normalized to recall)", (size.0 as i32 / 2, 16), title))
            .map_err(pe)?;
        let value_size = (cell as f64 * 0.3).clamp(12.0, 22.0);
        let label_size = 18.0;
        for (i, row) in report.confusion_normalized.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let x0 = left + j as i32 * cell;
                let y0 = top + i as i32 * cell;
                root.draw(&Rectangle::new([(x0, y0), (x0 + cell, y0 + cell)], heat(v).filled())).map_err(pe)?;
                let text_color = if v > 0.5 { WHITE } else { BLACK };
                let style = (FONT, value_size).into_font().color(&text_color).pos(Pos::new(HPos::Center, VPos::Center));
                root.draw(&Text::new(format!("{v:.2}"), (x0 + cell / 2, y0 + cell / 2), style)).map_err(pe)?;
            }
        }
        root.draw(&Rectangle::new([(left, top), (left + grid, top + grid)], BLACK.stroke_width(1))).map_err(pe)?;
        for (k, name) in names.iter().enumerate() {
            let mid = k as i32 * cell + cell / 2;
            let row_style = (FONT, label_size).into_font().color(&BLACK).pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(name.clone(), (left - 8, top + mid), row_style)).map_err(pe)?;
            let col_style = (FONT, label_size).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
            root.draw(&Text::new(name.clone(), (left + mid, top + grid + 8), col_style)).map_err(pe)?;
        }
        let axis = (FONT, 20).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new("predicted class", (left + grid / 2, top + grid + 40), axis.clone())).map_err(pe)?;
        let axis_v = (FONT, 20)
            .into_font()
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new("true class", (14, top + grid / 2), axis_v)).map_err(pe)?;
        // Colour bar.
        let bx = left + grid + 40;
        let steps = 50;
        for s in 0..steps {
            let v0 = 1.0 - s as f64 / steps as f64;
            let y0 = top + (grid as f64 * s as f64 / steps as f64) as i32;
            let y1 = top + (grid as f64 * (s + 1) as f64 / steps as f64) as i32;
            root.draw(&Rectangle::new([(bx, y0), (bx + 24, y1)], heat(v0).filled())).map_err(pe)?;
        }
        root.draw(&Rectangle::new([(bx, top), (bx + 24, top + grid)], BLACK.stroke_width(1))).map_err(pe)?;
        let tick = (FONT, 16).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
        for (v, label) in [(1.0, "1.0"), (0.5, "0.5"), (0.0, "0.0")] {
            let y = top + ((1.0 - v) * grid as f64) as i32;
            root.draw(&Text::new(label, (bx + 30, y), tick.clone())).map_err(pe)?;
        }
        Ok(())
    })
}

/// Per-class F1 as bars, with the value above each bar and the macro F1 as a dashed line.
pub fn plot_f1(report: &Report, class_names: &[String], path: &Path) -> Result<()> {
    let c = report.num_classes;
    if c == 0 {
        bail!("the report has no classes to plot");
    }
    let names = names_for(report, class_names);
    render_png(path, LINE_W, |a| {
        let mut chart = ChartBuilder::on(a)
            .caption("F1 score per class", (FONT, 28))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(78)
            .build_cartesian_2d(0f64..c as f64, 0f64..1.08)
            .map_err(pe)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("class")
            .y_desc("F1 score")
            .axis_desc_style((FONT, 20))
            .label_style((FONT, 16))
            .x_labels(c * 2 + 1)
            .x_label_formatter(&|x| {
                // Label only the bar centres (k + 0.5).
                let k = (x - 0.5).round();
                if (x - 0.5 - k).abs() < 1e-6 && k >= 0.0 {
                    names.get(k as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.1}"))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(pe)?;
        chart
            .draw_series(
                report
                    .per_class
                    .iter()
                    .enumerate()
                    .map(|(k, m)| Rectangle::new([(k as f64 + 0.15, 0.0), (k as f64 + 0.85, m.f1)], BLUE.filled())),
            )
            .map_err(pe)?;
        chart
            .draw_series(report.per_class.iter().enumerate().map(|(k, m)| {
                Text::new(
                    format!("{:.2}", m.f1),
                    (k as f64 + 0.5, m.f1 + 0.01),
                    (FONT, 16).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(pe)?;
        let macro_f1 = report.macro_avg.f1;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, macro_f1), (c as f64, macro_f1)],
                8,
                5,
                VERMILLION.stroke_width(2),
            ))
            .map_err(pe)?
            .label(format!("macro F1 {macro_f1:.3}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], VERMILLION.stroke_width(2)));
        chart
            .configure_series_labels()
            .label_font((FONT, 18))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(pe)?;
        Ok(())
    })
}

/// A plot drawn from the history alone.
type HistoryPlot = fn(&History, &Path) -> Result<()>;

/// Writes every plot into `dir`: `accuracy.png`, `loss.png`, `unfreezing.png`, `lr.png` from the history, and
/// `confusion_matrix.png`, `f1_per_class.png` when a report is given. Returns the written paths.
pub fn write_plots(dir: &Path, h: &History, report: Option<&Report>, class_names: &[String]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create plot folder {}", dir.display()))?;
    let mut written = Vec::new();
    let history_plots: [(&str, HistoryPlot); 4] = [
        ("accuracy.png", plot_accuracy),
        ("loss.png", plot_loss),
        ("unfreezing.png", plot_unfreezing),
        ("lr.png", plot_lr),
    ];
    for (name, f) in history_plots {
        let p = dir.join(name);
        f(h, &p)?;
        written.push(p);
    }
    if let Some(r) = report {
        let p = dir.join("confusion_matrix.png");
        plot_confusion(r, class_names, &p)?;
        written.push(p);
        let p = dir.join("f1_per_class.png");
        plot_f1(r, class_names, &p)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tick_tests {
    use super::*;

    #[test]
    fn log_axes_get_several_labelled_ticks() {
        // The demo's range (1e-3 and 5e-4, padded by 1.5): every integer multiple, since 1-2-5 gives only two.
        let t = log_ticks(5e-4 / 1.5, 1.5e-3);
        let labels: Vec<String> = t.iter().map(log_label).collect();
        assert_eq!(labels, ["4e-4", "5e-4", "6e-4", "7e-4", "8e-4", "9e-4", "1e-3"]);
        // A wide range: 1-2-5 only.
        let labels: Vec<String> = log_ticks(1e-6 / 1.5, 5e-5 * 1.5).iter().map(log_label).collect();
        assert_eq!(labels, ["1e-6", "2e-6", "5e-6", "1e-5", "2e-5", "5e-5"]);
        // A single value: the padded range's own integer ticks.
        assert!(log_ticks(1e-3 / 1.5, 1.5e-3).len() >= 2);
    }
}
