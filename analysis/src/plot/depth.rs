//! Accuracy (or loss) against test-time recurrence depth, one curve per split or difficulty,
//! depth on a log₂ axis: the paper's "more iterations, better answers" plot.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::combinators::LogCoord;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::{DrawError, Figure, Images, categorical, padded, save, sequential, text};
use crate::AnalysisError;

/// How curves are told apart: distinct hues for unordered series (splits), or one dark-to-bright
/// scale for ordered ones (difficulty levels), which shows their order and stays distinct past
/// the ten hues of the categorical palette.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colours {
    Categorical,
    Ordered,
}

impl Colours {
    /// The colour of curve `i` of `n`.
    pub fn pick(self, i: usize, n: usize) -> RGBColor {
        match self {
            Colours::Categorical => categorical(i),
            // Viridis stops short of its last yellows, which vanish on white.
            Colours::Ordered => sequential(0.85 * i as f64 / n.saturating_sub(1).max(1) as f64),
        }
    }
}

/// The range a curve spans across runs (seeds, say): `(depth, lowest, highest)` per point.
pub type Band = Vec<(usize, f64, f64)>;

pub struct DepthFigure<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    /// `(label, [(depth, value)])`.
    pub series: &'a [(String, Vec<(usize, f64)>)],
    /// One band per series, shaded in its colour under the curve; empty for none.
    pub bands: &'a [Band],
    pub colours: Colours,
}

impl Figure for DepthFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (860, 540)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let depths = || self.series.iter().flat_map(|(_, p)| p.iter().map(|(d, _)| *d as f64));
        let lo = depths().fold(f64::INFINITY, f64::min);
        let hi = depths().fold(0.0, f64::max);
        let values = self.series.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v));
        let edges = self.bands.iter().flat_map(|b| b.iter().flat_map(|(_, l, h)| [*l, *h]));
        let (y0, y1) = padded(values.chain(edges));
        let x_desc = "recurrence depth at test time (log₂ scale)";
        let mut chart = log2_chart(root, self.title, (lo, hi), (y0, y1), (x_desc, self.y_label))?;
        for (s, band) in self.bands.iter().enumerate() {
            let colour = self.colours.pick(s, self.series.len());
            let mut band = band.clone();
            band.sort_by_key(|(d, _, _)| *d);
            // The upper edge left to right, then the lower edge back.
            let upper = band.iter().map(|(d, _, h)| (*d as f64, *h));
            let lower = band.iter().rev().map(|(d, l, _)| (*d as f64, *l));
            chart.draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                colour.mix(0.18).filled(),
            )))?;
        }
        for (s, (label, points)) in self.series.iter().enumerate() {
            let colour = self.colours.pick(s, self.series.len());
            let mut points = points.clone();
            points.sort_by_key(|(d, _)| *d);
            let xy: Vec<(f64, f64)> = points.iter().map(|(d, v)| (*d as f64, *v)).collect();
            chart
                .draw_series(LineSeries::new(xy, colour.stroke_width(2)).point_size(4))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        legend(&mut chart)
    }
}

/// A chart whose x axis is log₂ (depths, steps) from `x.0` to `x.1`, padded a quarter step
/// either side, with labels at powers of two, and a linear y axis.
pub(super) fn log2_chart<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    title: &str,
    x: (f64, f64),
    y: (f64, f64),
    (x_desc, y_desc): (&str, &str),
) -> Result<ChartContext<'a, DB, Cartesian2d<LogCoord<f64>, RangedCoordf64>>, DrawError> {
    let mut chart = ChartBuilder::on(root)
        .caption(title, text(20.0))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((x.0 / 1.25..x.1 * 1.25).log_scale().base(2.0), y.0..y.1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        // Few enough labels that plotters puts them at powers of two only.
        .x_labels(8)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(text(12.0))
        .axis_desc_style(text(14.0))
        .draw()?;
    Ok(chart)
}

/// The series' legend, in the lower right (where accuracy curves leave room).
pub(super) fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<LogCoord<f64>, RangedCoordf64>>,
) -> Result<(), DrawError> {
    chart
        .configure_series_labels()
        .label_font(text(13.0))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}

/// Writes `value` against depth, one curve per `(label, [(depth, value)])`, to
/// `<base>.png|svg`. Depths must be at least 1.
pub fn plot_depth_curves(
    base: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(usize, f64)>)],
    colours: Colours,
) -> Result<Images, AnalysisError> {
    plot_depth_bands(base, title, y_label, series, &[], colours)
}

/// As [`plot_depth_curves`], each curve over its band (`bands[i]` under `series[i]`): a mean
/// across runs over the range the runs span.
pub fn plot_depth_bands(
    base: &Path,
    title: &str,
    y_label: &str,
    series: &[(String, Vec<(usize, f64)>)],
    bands: &[Band],
    colours: Colours,
) -> Result<Images, AnalysisError> {
    if series.is_empty()
        || series
            .iter()
            .any(|(_, p)| p.is_empty() || p.iter().any(|(d, _)| *d == 0))
        || bands.iter().flatten().any(|(d, _, _)| *d == 0)
    {
        return Err(AnalysisError::Invalid("depth curves need points at depths ≥ 1".into()));
    }
    if !bands.is_empty() && bands.len() != series.len() {
        return Err(AnalysisError::Invalid(format!(
            "{} bands for {} curves; give one per curve or none",
            bands.len(),
            series.len()
        )));
    }
    save(
        &DepthFigure {
            title,
            y_label,
            series,
            bands,
            colours,
        },
        base,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_curves_get_one_distinct_colour_each_dark_to_bright() {
        // Thirteen hop counts: more than the categorical palette's ten hues.
        let n = 13;
        let ordered: Vec<RGBColor> = (0..n).map(|i| Colours::Ordered.pick(i, n)).collect();
        for (i, a) in ordered.iter().enumerate() {
            assert!(ordered[i + 1..].iter().all(|b| b != a), "curve {i} shares its colour");
        }
        let brightness = |c: &RGBColor| c.0 as u32 + c.1 as u32 + c.2 as u32;
        assert!(brightness(&ordered[0]) < brightness(&ordered[n - 1]));
        assert_eq!(Colours::Categorical.pick(0, n), Colours::Categorical.pick(10, n));
        assert_eq!(Colours::Ordered.pick(0, 1), sequential(0.0));
    }
}
