//! The per-100-ms plot of a drill: requests that succeeded and failed,
//! binned by the time they were sent, around the fault (x = 0).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One bin of the timeline.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Bin {
    /// Start of the bin, seconds relative to the fault.
    pub t: f64,
    pub ok: u32,
    pub failed: u32,
}

/// Marks drawn as vertical lines (the fault at 0, a heal, a restart...).
#[derive(Clone, Debug)]
pub struct Mark {
    pub t: f64,
    pub label: String,
}

/// Writes an SVG of `bins` (width `bin_s` seconds) with `marks`.
pub fn svg(path: &Path, title: &str, bins: &[Bin], bin_s: f64, marks: &[Mark]) -> Result<()> {
    svg_with_x(
        path,
        title,
        "seconds since the fault (requests by send time)",
        bins,
        bin_s,
        marks,
    )
}

/// [`svg`] with another description of the x axis (`experiments` bins by
/// time since the load started).
pub fn svg_with_x(
    path: &Path,
    title: &str,
    x_desc: &str,
    bins: &[Bin],
    bin_s: f64,
    marks: &[Mark],
) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let x0 = bins.first().map_or(-1.0, |b| b.t);
    let x1 = bins.last().map_or(1.0, |b| b.t + bin_s);
    let ymax = bins
        .iter()
        .map(|b| b.ok.max(b.failed))
        .max()
        .unwrap_or(1)
        .max(1);
    let ymax = f64::from(ymax) * 1.15;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(format!("requests per {} ms", (bin_s * 1000.0).round()))
        .draw()
        .map_err(|x| e(&x))?;
    // Steps: each bin is flat over its width.
    let steps = |f: fn(&Bin) -> u32| -> Vec<(f64, f64)> {
        bins.iter()
            .flat_map(|b| [(b.t, f64::from(f(b))), (b.t + bin_s, f64::from(f(b)))])
            .collect()
    };
    let green = RGBColor(0x1a, 0x9c, 0x3a);
    chart
        .draw_series(LineSeries::new(steps(|b| b.ok), green.stroke_width(2)))
        .map_err(|x| e(&x))?
        .label("succeeded")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], green.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(steps(|b| b.failed), RED.stroke_width(2)))
        .map_err(|x| e(&x))?
        .label("failed")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
    for m in marks {
        chart
            .draw_series(LineSeries::new(
                [(m.t, 0.0), (m.t, ymax)],
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(|x| e(&x))?;
        chart
            .draw_series([Text::new(
                m.label.clone(),
                (m.t, ymax * 0.97),
                ("sans-serif", 13).into_font(),
            )])
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_written_with_both_series_and_the_fault_mark() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("drill-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("p.svg");
        let bins: Vec<Bin> = (-5..10)
            .map(|k| Bin {
                t: f64::from(k) * 0.1,
                ok: if (0..3).contains(&k) { 0 } else { 20 },
                failed: if (0..3).contains(&k) { 20 } else { 0 },
            })
            .collect();
        let marks = [Mark {
            t: 0.0,
            label: "kill".into(),
        }];
        svg(&path, "test", &bins, 0.1, &marks)?;
        let s = std::fs::read_to_string(&path)?;
        assert!(s.starts_with("<svg"), "{}", &s[..s.len().min(100)]);
        assert!(s.contains("succeeded") && s.contains("failed") && s.contains("kill"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
