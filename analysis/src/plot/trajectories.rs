//! Per-token latent trajectories in PCA space (the paper's Fig. 12): one row per token, one
//! panel per pair of components (PC1–PC2, PC3–PC4, PC5–PC6), the path coloured by iteration
//! from dark to bright, its centre of mass marked, its dynamics motif in the panel title.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::colorbar::draw_colorbar;
use super::{DrawError, Figure, Images, padded, save, sequential, text};
use crate::AnalysisError;
use crate::dynamics::Dynamics;

/// One token's trajectory.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTrajectory {
    pub label: String,
    /// `[R+1][k]`: its coordinates at every iteration.
    pub points: Vec<Vec<f32>>,
    pub dynamics: Option<Dynamics>,
}

pub struct TrajectoryFigure<'a> {
    pub title: &'a str,
    pub tokens: &'a [TokenTrajectory],
    /// 0-based component pairs, one panel column each.
    pub pairs: &'a [(usize, usize)],
}

const PANEL: (u32, u32) = (330, 290);
const BAR: u32 = 120;
const TITLE: u32 = 44;

impl TrajectoryFigure<'_> {
    fn steps(&self) -> usize {
        self.tokens
            .iter()
            .map(|t| t.points.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
    }
}

impl Figure for TrajectoryFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (
            PANEL.0 * self.pairs.len().max(1) as u32 + BAR,
            PANEL.1 * self.tokens.len().max(1) as u32 + TITLE,
        )
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let root = root.titled(self.title, text(20.0))?;
        let (grid, bar) = root.split_horizontally(root.dim_in_pixel().0 - BAR);
        let steps = self.steps();
        let fraction = |i: usize| i as f64 / steps.max(1) as f64;
        let panels = grid.split_evenly((self.tokens.len().max(1), self.pairs.len().max(1)));
        for (row, token) in self.tokens.iter().enumerate() {
            for (col, &(a, b)) in self.pairs.iter().enumerate() {
                let area = &panels[row * self.pairs.len() + col];
                let xy: Vec<(f64, f64)> = token.points.iter().map(|p| (p[a] as f64, p[b] as f64)).collect();
                let n = xy.len().max(1) as f64;
                let centre = (
                    xy.iter().map(|p| p.0).sum::<f64>() / n,
                    xy.iter().map(|p| p.1).sum::<f64>() / n,
                );
                let caption = match &token.dynamics {
                    Some(d) => format!("{}: {}", token.label, d.motif.name()),
                    None => token.label.clone(),
                };
                let (x0, x1) = padded(xy.iter().map(|p| p.0));
                let (y0, y1) = padded(xy.iter().map(|p| p.1));
                let mut chart = ChartBuilder::on(area)
                    .caption(caption, text(15.0))
                    .margin(6)
                    .x_label_area_size(36)
                    .y_label_area_size(48)
                    .build_cartesian_2d(x0..x1, y0..y1)?;
                chart
                    .configure_mesh()
                    .x_desc(format!("PC{}", a + 1))
                    .y_desc(format!("PC{}", b + 1))
                    .x_labels(5)
                    .y_labels(5)
                    .label_style(text(11.0))
                    .axis_desc_style(text(13.0))
                    .light_line_style(WHITE)
                    .draw()?;
                chart.draw_series(
                    xy.windows(2)
                        .enumerate()
                        .map(|(i, w)| PathElement::new(vec![w[0], w[1]], sequential(fraction(i + 1)).stroke_width(2))),
                )?;
                chart.draw_series(
                    xy.iter()
                        .enumerate()
                        .map(|(i, &p)| Circle::new(p, 2, sequential(fraction(i)).filled())),
                )?;
                let marker = chart.draw_series(std::iter::once(Cross::new(centre, 6, RED.stroke_width(3))))?;
                if row == 0 && col == 0 {
                    marker
                        .label("centre of mass")
                        .legend(|(x, y)| Cross::new((x + 8, y), 5, RED.stroke_width(3)));
                    chart
                        .configure_series_labels()
                        .label_font(text(11.0))
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .position(SeriesLabelPosition::UpperRight)
                        .draw()?;
                }
            }
        }
        draw_colorbar(
            &bar,
            (0.0, steps as f64),
            "iteration",
            (30, 40),
            |v| sequential(v / steps.max(1) as f64),
            |v| format!("{v:.0}"),
        )
    }
}

/// The consecutive pairs of `k` components, 0-based: `(0, 1), (2, 3), …` (the paper's
/// PC1–PC2, PC3–PC4, PC5–PC6 for six).
pub fn component_pairs(k: usize) -> Vec<(usize, usize)> {
    (0..k / 2).map(|p| (2 * p, 2 * p + 1)).collect()
}

/// Writes the trajectory grid of `tokens` over component `pairs` to `<base>.png|svg`.
pub fn plot_trajectories(
    base: &Path,
    title: &str,
    tokens: &[TokenTrajectory],
    pairs: &[(usize, usize)],
) -> Result<Images, AnalysisError> {
    check(tokens, pairs)?;
    save(&TrajectoryFigure { title, tokens, pairs }, base)
}

/// The inputs a trajectory figure needs: some tokens, some pairs, every point with every
/// component a pair names.
pub(crate) fn check(tokens: &[TokenTrajectory], pairs: &[(usize, usize)]) -> Result<(), AnalysisError> {
    if tokens.is_empty() || pairs.is_empty() {
        return Err(AnalysisError::Invalid(
            "a trajectory plot needs tokens and component pairs".into(),
        ));
    }
    let needed = pairs.iter().map(|&(a, b)| a.max(b) + 1).max().unwrap_or(0);
    if let Some(t) = tokens
        .iter()
        .find(|t| t.points.is_empty() || t.points.iter().any(|p| p.len() < needed))
    {
        return Err(AnalysisError::Invalid(format!(
            "trajectory {:?} has no points or fewer than the {needed} components the pairs name",
            t.label
        )));
    }
    Ok(())
}
