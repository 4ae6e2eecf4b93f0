//! The convergence heat map (the paper's Fig. 11): tokens down, iterations across, colour the
//! distance `‖ln_f(s_i) − s*‖` of each token's normalised state from where a much longer run
//! ends, on a log scale, so that token-specific convergence rates and oscillations show.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::colorbar::draw_colorbar;
use super::{DrawError, Figure, Images, save, sequential, text};
use crate::AnalysisError;

pub struct ConvergenceFigure<'a> {
    pub title: &'a str,
    /// One label per token (row).
    pub labels: &'a [String],
    /// `[tokens][iterations]`: distances, iteration 0 first.
    pub distances: &'a [Vec<f32>],
}

/// The most decades the colour scale spans below the largest distance: exact zeros (the
/// reference itself) and rounding noise would otherwise flatten everything else.
const DECADES: f64 = 8.0;
const ROW: u32 = 16;
const MOST_LABELS: usize = 60;

impl ConvergenceFigure<'_> {
    /// The colour scale, `(lo, hi)` in log10 units.
    pub fn log_range(&self) -> (f64, f64) {
        let positive = self.distances.iter().flatten().filter(|d| **d > 0.0 && d.is_finite());
        let (lo, hi) = positive.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &d| {
            (lo.min((d as f64).log10()), hi.max((d as f64).log10()))
        });
        if lo > hi {
            return (-1.0, 0.0);
        }
        (lo.max(hi - DECADES), hi)
    }

    /// Room for the longest token label (about 7 px a character at the label size).
    fn label_width(&self) -> u32 {
        let longest = self.labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u32;
        (40 + 7 * longest).min(240)
    }

    fn iterations(&self) -> usize {
        self.distances.iter().map(Vec::len).max().unwrap_or(0)
    }
}

impl Figure for ConvergenceFigure<'_> {
    fn size(&self) -> (u32, u32) {
        let width = 20 + self.label_width() + (5 * self.iterations() as u32).clamp(520, 1400) + 120;
        let height = 110 + (ROW * self.distances.len() as u32).max(240);
        (width, height)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let root = root.titled(self.title, text(20.0))?;
        let (main, bar) = root.split_horizontally(root.dim_in_pixel().0 - 120);
        let rows = self.distances.len();
        let cols = self.iterations();
        let (lo, hi) = self.log_range();
        let colour = |d: f32| {
            let log = if d > 0.0 { (d as f64).log10() } else { lo };
            sequential((log - lo) / (hi - lo).max(1e-12))
        };
        // Rows in half-steps: row `t` (top first) spans `2(rows−t−1)..2(rows−t)`, so its label
        // sits on the odd integer between.
        let every = rows.div_ceil(MOST_LABELS).max(1);
        let key_rows: Vec<i32> = (0..rows).step_by(every).map(|t| 2 * (rows - t) as i32 - 1).collect();
        let mut chart = ChartBuilder::on(&main)
            .margin(8)
            .margin_right(4)
            .x_label_area_size(40)
            .y_label_area_size(self.label_width())
            .build_cartesian_2d(-0.5..cols as f64 - 0.5, (0..2 * rows as i32).with_key_points(key_rows))?;
        let label_of = |y: &i32| {
            let t = rows as i32 - (y + 1) / 2;
            usize::try_from(t)
                .ok()
                .and_then(|t| self.labels.get(t))
                .cloned()
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("iteration i")
            .y_desc("token")
            .y_label_formatter(&label_of)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(text(12.0))
            .axis_desc_style(text(14.0))
            .draw()?;
        chart.draw_series(self.distances.iter().enumerate().flat_map(|(t, row)| {
            let y = 2 * (rows - t - 1) as i32;
            row.iter()
                .enumerate()
                .map(move |(i, &d)| Rectangle::new([(i as f64 - 0.5, y), (i as f64 + 0.5, y + 2)], colour(d).filled()))
        }))?;
        draw_colorbar(
            &bar,
            (lo, hi),
            "log₁₀ ‖ln_f(s_i) − s*‖",
            (8, 48),
            None,
            |v| sequential((v - lo) / (hi - lo).max(1e-12)),
            |v| format!("{v:.1}"),
        )
    }
}

/// Writes the heat map of `distances` (`[tokens][iterations]`) to `<base>.png|svg`.
pub fn plot_convergence(
    base: &Path,
    title: &str,
    labels: &[String],
    distances: &[Vec<f32>],
) -> Result<Images, AnalysisError> {
    if distances.is_empty() || labels.len() != distances.len() {
        return Err(AnalysisError::Invalid(format!(
            "a heat map needs one label per row: {} labels, {} rows",
            labels.len(),
            distances.len()
        )));
    }
    save(
        &ConvergenceFigure {
            title,
            labels,
            distances,
        },
        base,
    )
}
