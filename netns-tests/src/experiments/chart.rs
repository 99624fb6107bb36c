//! Plots of `experiments`: bar panels (throughput, latency, shares per
//! variant) and line charts (a figure per 100 ms, or per load step, for
//! several variants).
//! The drill's success/failure timeline is reused as it is
//! ([`crate::drill::plot::svg_with_x`]).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Colours of the variants, in order.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// One bar: label, value, colour.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub color: RGBColor,
}

/// A panel of bars.
pub struct Panel {
    pub title: String,
    pub y_desc: String,
    pub bars: Vec<Bar>,
}

fn err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> anyhow::Error + '_ {
    move |e| anyhow!("plotting {}: {e}", path.display())
}

fn draw_panel(area: &DrawingArea<SVGBackend, Shift>, p: &Panel, path: &Path) -> Result<()> {
    let e = err(path);
    let n = p.bars.len().max(1) as f64;
    let ymax = p.bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-9) * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(10)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..n, 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(p.y_desc.as_str())
        .draw()
        .map_err(|x| e(&x))?;
    for (i, b) in p.bars.iter().enumerate() {
        let x = i as f64;
        chart
            .draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, b.value)],
                b.color.filled(),
            )])
            .map_err(|x| e(&x))?;
        let v = if b.value >= 100.0 {
            format!("{:.0}", b.value)
        } else {
            format!("{:.1}", b.value)
        };
        chart
            .draw_series([
                Text::new(
                    b.label.clone(),
                    (x + 0.12, b.value + ymax * 0.09),
                    ("sans-serif", 11).into_font(),
                ),
                Text::new(
                    v,
                    (x + 0.12, b.value + ymax * 0.045),
                    ("sans-serif", 11).into_font(),
                ),
            ])
            .map_err(|x| e(&x))?;
    }
    Ok(())
}

/// Writes `panels` side by side into one SVG under `title`.
pub fn bars(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    let e = err(path);
    let w = 380 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (w, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|x| e(&x))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (a, p) in areas.iter().zip(panels) {
        draw_panel(a, p, path)?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// One line of a line chart.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// Writes a line chart of `lines` (x in seconds).
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, lines: &[Line]) -> Result<()> {
    lines_with(path, title, x_desc, y_desc, lines, &LineStyle::default())
}

/// How [`lines_with`] draws.
#[derive(Clone, Copy, Debug, Default)]
pub struct LineStyle {
    /// Top of the y axis (default: the largest value plus 15 %).
    pub y_max: Option<f64>,
    /// A dot at every point (few points: a figure per load step).
    pub markers: bool,
}

/// Writes a line chart of `lines` (any x, from 0) in `style`.
pub fn lines_with(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    style: &LineStyle,
) -> Result<()> {
    let e = err(path);
    let pts = || lines.iter().flat_map(|l| l.points.iter());
    let x1 = pts().map(|p| p.0).fold(0.1, f64::max) * if style.markers { 1.05 } else { 1.0 };
    let ymax = style
        .y_max
        .unwrap_or_else(|| pts().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.15);
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x1, 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|x| e(&x))?;
    for l in lines {
        let c = l.color;
        chart
            .draw_series(LineSeries::new(l.points.clone(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(l.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
        if style.markers {
            chart
                .draw_series(l.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|x| e(&x))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
