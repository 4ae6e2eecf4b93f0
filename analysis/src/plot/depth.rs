//! Accuracy (or loss) against test-time recurrence depth, one curve per split or difficulty,
//! depth on a log₂ axis: the paper's "more iterations, better answers" plot.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{DrawError, Figure, Images, categorical, padded, save, text};
use crate::AnalysisError;

pub struct DepthFigure<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    /// `(label, [(depth, value)])`.
    pub series: &'a [(String, Vec<(usize, f64)>)],
}

impl Figure for DepthFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (860, 540)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let depths = || self.series.iter().flat_map(|(_, p)| p.iter().map(|(d, _)| *d as f64));
        let lo = depths().fold(f64::INFINITY, f64::min);
        let hi = depths().fold(0.0, f64::max);
        let (y0, y1) = padded(self.series.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v)));
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, text(20.0))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d((lo / 1.25..hi * 1.25).log_scale().base(2.0), y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("recurrence depth at test time (log₂ scale)")
            .y_desc(self.y_label)
            // Few enough labels that plotters puts them at powers of two only.
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(text(12.0))
            .axis_desc_style(text(14.0))
            .draw()?;
        for (s, (label, points)) in self.series.iter().enumerate() {
            let colour = categorical(s);
            let mut points = points.clone();
            points.sort_by_key(|(d, _)| *d);
            let xy: Vec<(f64, f64)> = points.iter().map(|(d, v)| (*d as f64, *v)).collect();
            chart
                .draw_series(LineSeries::new(xy, colour.stroke_width(2)).point_size(4))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font(text(13.0))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        Ok(())
    }
}

/// Writes `value` against depth, one curve per `(label, [(depth, value)])`, to
/// `<base>.png|svg`. Depths must be at least 1.
pub fn plot_depth_curves(
    base: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(usize, f64)>)],
) -> Result<Images, AnalysisError> {
    if series.is_empty()
        || series
            .iter()
            .any(|(_, p)| p.is_empty() || p.iter().any(|(d, _)| *d == 0))
    {
        return Err(AnalysisError::Invalid("depth curves need points at depths ≥ 1".into()));
    }
    save(&DepthFigure { title, y_label, series }, base)
}
