//! Steps-to-exit histograms (the paper's Fig. 10): how many recurrence steps each token needed
//! before an exit criterion fired, one translucent series per criterion (or per task, per
//! setting), overlaid, each with its mean in the legend.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{DrawError, Figure, Images, categorical, save, text};
use crate::AnalysisError;

pub struct ExitHistogram<'a> {
    pub title: &'a str,
    /// What is counted (the y axis): tokens, answers.
    pub unit: &'a str,
    pub series: &'a [(String, Vec<usize>)],
}

/// At most this many bins; wider bins group several step counts.
const MOST_BINS: usize = 64;

/// The binning of step counts `0..=max`: `(bin width, bin count)`.
pub fn bins(max: usize) -> (usize, usize) {
    let width = (max + 1).div_ceil(MOST_BINS).max(1);
    (width, (max + 1).div_ceil(width))
}

/// How many of `values` fall in each bin `[b·width, (b+1)·width)`, for `count` bins.
pub fn bin_counts(values: &[usize], width: usize, count: usize) -> Vec<usize> {
    let mut counts = vec![0; count];
    for &v in values {
        counts[(v / width).min(count - 1)] += 1;
    }
    counts
}

/// The mean of a series, as shown in the legend.
pub fn mean(values: &[usize]) -> f64 {
    values.iter().sum::<usize>() as f64 / values.len().max(1) as f64
}

impl Figure for ExitHistogram<'_> {
    fn size(&self) -> (u32, u32) {
        (900, 540)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let max = self
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .max()
            .unwrap_or(0);
        let (width, count) = bins(max);
        let counts: Vec<Vec<usize>> = self.series.iter().map(|(_, v)| bin_counts(v, width, count)).collect();
        let top = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, text(20.0))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5..(count * width) as f64 - 0.5, 0..top + top.div_ceil(10))?;
        chart
            .configure_mesh()
            .x_desc("steps to exit")
            .y_desc(self.unit)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(text(12.0))
            .axis_desc_style(text(14.0))
            .light_line_style(WHITE)
            .draw()?;
        for (s, ((label, values), counts)) in self.series.iter().zip(&counts).enumerate() {
            let colour = categorical(s);
            let left = |b: usize| (b * width) as f64 - 0.5;
            let bars = counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(b, &c)| Rectangle::new([(left(b), 0), (left(b + 1), c)], colour.mix(0.35).filled()));
            chart
                .draw_series(bars)?
                .label(format!("{label} (mean {:.1})", mean(values)))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], colour.mix(0.6).filled()));
            let outlines = counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(b, &c)| Rectangle::new([(left(b), 0), (left(b + 1), c)], colour.stroke_width(1)));
            chart.draw_series(outlines)?;
        }
        chart
            .configure_series_labels()
            .label_font(text(13.0))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    }
}

/// Writes overlaid histograms of steps-to-exit, one per `(label, steps of each counted
/// `unit`)`, to `<base>.png|svg`.
pub fn plot_exit_histogram(
    base: &Path,
    title: &str,
    unit: &str,
    series: &[(String, Vec<usize>)],
) -> Result<Images, AnalysisError> {
    if series.is_empty() || series.iter().any(|(_, v)| v.is_empty()) {
        return Err(AnalysisError::Invalid("a histogram needs series with values".into()));
    }
    save(&ExitHistogram { title, unit, series }, base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_every_value_and_count_them() {
        assert_eq!(bins(10), (1, 11));
        assert_eq!(bins(63), (1, 64));
        assert_eq!(bins(64), (2, 33));
        assert_eq!(bins(1000), (16, 63));
        let values = [0, 1, 1, 5, 9, 10];
        assert_eq!(bin_counts(&values, 1, 11), [1, 2, 0, 0, 0, 1, 0, 0, 0, 1, 1]);
        assert_eq!(bin_counts(&values, 4, 3), [3, 1, 2]);
        assert_eq!(mean(&values), 26.0 / 6.0);
    }
}
