//! Per-token latent trajectories in PCA space (the paper's Fig. 12): one row per token, one
//! panel per pair of components (PC1–PC2, PC3–PC4, PC5–PC6), the path coloured by iteration
//! from dark to bright on a logarithmic scale (the state moves in the first few iterations),
//! its start, its end and its centre of mass marked, arrowheads on its first segments, the
//! token, its position and its dynamics motif in the panel title.

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
        let colour = |i: usize| iteration_colour(i, steps);
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
                    Some(d) => format!("{}: {}", panel_title(&token.label), d.motif.name()),
                    None => panel_title(&token.label),
                };
                let (x0, x1) = padded(xy.iter().map(|p| p.0));
                let (y0, y1) = padded(xy.iter().map(|p| p.1));
                let mut chart = ChartBuilder::on(area)
                    .caption(caption, text(13.0))
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
                // Late (converged) iterations first, so the early moves stay on top.
                chart.draw_series(
                    xy.windows(2)
                        .enumerate()
                        .rev()
                        .map(|(i, w)| PathElement::new(vec![w[0], w[1]], colour(i + 1).stroke_width(2))),
                )?;
                chart.draw_series(
                    xy.iter()
                        .enumerate()
                        .rev()
                        .map(|(i, &p)| Circle::new(p, 2, colour(i).filled())),
                )?;
                // Direction: an arrowhead halfway along each of the first segments that is long
                // enough on screen to carry one.
                let pixel = |p: (f64, f64)| chart.backend_coord(&p);
                let arrows: Vec<_> = xy
                    .windows(2)
                    .take(ARROWS)
                    .enumerate()
                    .filter_map(|(i, w)| {
                        let (p, q) = (pixel(w[0]), pixel(w[1]));
                        let (dx, dy) = ((q.0 - p.0) as f64, (q.1 - p.1) as f64);
                        let length = dx.hypot(dy);
                        (length >= MIN_ARROW_SEGMENT).then(|| {
                            let middle = ((w[0].0 + w[1].0) / 2.0, (w[0].1 + w[1].1) / 2.0);
                            (middle, arrowhead((dx / length, dy / length)), colour(i + 1))
                        })
                    })
                    .collect();
                chart.draw_series(arrows.into_iter().map(|(at, corners, fill)| {
                    let mut outline = corners.to_vec();
                    outline.push(corners[0]);
                    EmptyElement::at(at)
                        + Polygon::new(corners.to_vec(), fill.filled())
                        + PathElement::new(outline, BLACK.stroke_width(1))
                }))?;
                let start = xy[0];
                let end = xy[xy.len() - 1];
                let first = row == 0 && col == 0;
                let started = chart.draw_series(std::iter::once(
                    EmptyElement::at(start)
                        + Circle::new((0, 0), 6, colour(0).filled())
                        + Circle::new((0, 0), 6, BLACK.stroke_width(2)),
                ))?;
                if first {
                    started.label("start (iteration 0)").legend(move |(x, y)| {
                        EmptyElement::at((x + 8, y))
                            + Circle::new((0, 0), 5, colour(0).filled())
                            + Circle::new((0, 0), 5, BLACK.stroke_width(2))
                    });
                }
                let ended = chart.draw_series(std::iter::once(
                    EmptyElement::at(end)
                        + Rectangle::new([(-5, -5), (5, 5)], colour(steps).filled())
                        + Rectangle::new([(-5, -5), (5, 5)], BLACK.stroke_width(2)),
                ))?;
                if first {
                    ended.label(format!("end (iteration {steps})")).legend(move |(x, y)| {
                        EmptyElement::at((x + 8, y))
                            + Rectangle::new([(-4, -4), (4, 4)], colour(steps).filled())
                            + Rectangle::new([(-4, -4), (4, 4)], BLACK.stroke_width(2))
                    });
                }
                let marker = chart.draw_series(std::iter::once(Cross::new(centre, 6, RED.stroke_width(3))))?;
                if first {
                    marker
                        .label("centre of mass")
                        .legend(|(x, y)| Cross::new((x + 8, y), 5, RED.stroke_width(3)));
                    chart
                        .configure_series_labels()
                        .label_font(text(11.0))
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .position(emptiest_corner(&xy, (x0, x1), (y0, y1)))
                        .draw()?;
                }
            }
        }
        let ticks = iteration_ticks(steps);
        draw_colorbar(
            &bar,
            (0.0, iteration_scale(steps, steps)),
            "iteration (log scale)",
            (30, 40),
            Some(&ticks),
            |v| sequential(v / iteration_scale(steps, steps).max(f64::MIN_POSITIVE)),
            |v| format!("{}", (v.exp() - 1.0).round()),
        )
    }
}

/// The corner of the panel with the fewest of `xy`'s points near it, for the legend.
fn emptiest_corner(xy: &[(f64, f64)], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let fraction = |v: f64, (lo, hi): (f64, f64)| (v - lo) / (hi - lo).max(f64::MIN_POSITIVE);
    let near = |right: bool, top: bool| {
        xy.iter()
            .filter(|p| {
                let (fx, fy) = (fraction(p.0, x), fraction(p.1, y));
                (if right { fx > 0.5 } else { fx < 0.5 }) && (if top { fy > 0.6 } else { fy < 0.4 })
            })
            .count()
    };
    [
        (near(true, true), SeriesLabelPosition::UpperRight),
        (near(false, true), SeriesLabelPosition::UpperLeft),
        (near(true, false), SeriesLabelPosition::LowerRight),
        (near(false, false), SeriesLabelPosition::LowerLeft),
    ]
    .into_iter()
    .min_by_key(|(count, _)| *count)
    .map(|(_, corner)| corner)
    .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// Arrowheads on at most this many of a trajectory's first segments.
const ARROWS: usize = 6;
/// The shortest segment, in pixels, that gets an arrowhead.
const MIN_ARROW_SEGMENT: f64 = 14.0;

/// The corners, in pixels around its centre, of an arrowhead pointing along the unit pixel
/// vector `direction`: tip first.
fn arrowhead(direction: (f64, f64)) -> [(i32, i32); 3] {
    let (ux, uy) = direction;
    let (nx, ny) = (-uy, ux);
    let corner = |along: f64, across: f64| {
        (
            (along * ux + across * nx).round() as i32,
            (along * uy + across * ny).round() as i32,
        )
    };
    [corner(6.0, 0.0), corner(-5.0, 4.5), corner(-5.0, -4.5)]
}

/// Where iteration `i` of `steps` lies on the colour scale: `ln(1 + i)`, so that the first
/// iterations, where the state moves, spread over most of the colours and the converged tail
/// shares the bright end.
pub fn iteration_scale(i: usize, steps: usize) -> f64 {
    (i.min(steps) as f64).ln_1p()
}

/// The colour of iteration `i` of `steps` (viridis over [`iteration_scale`]).
pub fn iteration_colour(i: usize, steps: usize) -> RGBColor {
    let top = iteration_scale(steps, steps);
    if top <= 0.0 {
        return sequential(0.0);
    }
    sequential(iteration_scale(i, steps) / top)
}

/// The colour bar's ticks, on the [`iteration_scale`]: iterations 0, 1, 2, 4, 8, … and the last.
fn iteration_ticks(steps: usize) -> Vec<f64> {
    let mut ticks: Vec<usize> = std::iter::once(0)
        .chain(std::iter::successors(Some(1usize), |i| i.checked_mul(2)).take_while(|&i| i < steps))
        .collect();
    // The last iteration, unless it would crowd the power of two below it.
    match ticks.last() {
        Some(&last) if last > 0 && (steps as f64) < 1.3 * last as f64 => {
            ticks.pop();
        }
        _ => {}
    }
    ticks.push(steps);
    ticks.dedup();
    ticks.into_iter().map(|i| iteration_scale(i, steps)).collect()
}

/// A panel's title from a token's label: the analysis labels tokens `<position> "<text>"` or
/// `<position> #<id>`, which reads `token "<text>" at position <position>` (or `token id <id>
/// at position <position>`); any other label stands as it is.
pub fn panel_title(label: &str) -> String {
    let Some((position, token)) = label.split_once(' ') else {
        return label.to_string();
    };
    if position.parse::<usize>().is_err() {
        return label.to_string();
    }
    if let Some(id) = token.strip_prefix('#').filter(|id| id.parse::<u64>().is_ok()) {
        format!("token id {id} at position {position}")
    } else if token.len() >= 2 && token.starts_with('"') && token.ends_with('"') {
        format!("token {token} at position {position}")
    } else {
        label.to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb(c: RGBColor) -> (u8, u8, u8) {
        (c.0, c.1, c.2)
    }

    #[test]
    fn iteration_colours_spread_the_first_iterations() {
        let steps = 64;
        let shown = [0, 1, 2, 4, 8, 16, 32, 64];
        let colours: Vec<_> = shown.iter().map(|&i| rgb(iteration_colour(i, steps))).collect();
        for (i, a) in colours.iter().enumerate() {
            for b in &colours[i + 1..] {
                assert_ne!(a, b, "iterations {shown:?} share a colour: {colours:?}");
            }
        }
        // Logarithmic: the steps 0→1→2→4→8 each take a sixth of the scale or more, where a
        // linear scale would give the first eight iterations an eighth of it together.
        let scale = |i: usize| iteration_scale(i, steps) / iteration_scale(steps, steps);
        for w in [0, 1, 2, 4, 8].windows(2) {
            let gap = scale(w[1]) - scale(w[0]);
            assert!(
                gap > 0.09,
                "iterations {} to {} span only {gap:.3} of the scale",
                w[0],
                w[1]
            );
        }
        assert!(scale(8) > 0.5, "the first eight iterations cover half the colours");
        assert_eq!(scale(0), 0.0);
        assert!((scale(steps) - 1.0).abs() < 1e-12);
        assert_eq!(rgb(iteration_colour(steps, steps)), rgb(sequential(1.0)));
        // A single iterate draws in the first colour, without dividing by zero.
        assert_eq!(rgb(iteration_colour(0, 0)), rgb(sequential(0.0)));
    }

    #[test]
    fn colour_bar_ticks_at_powers_of_two() {
        let iterations = |steps| -> Vec<usize> {
            iteration_ticks(steps)
                .iter()
                .map(|v: &f64| (v.exp() - 1.0).round() as usize)
                .collect()
        };
        assert_eq!(iterations(64), [0, 1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(iterations(48), [0, 1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(iterations(40), [0, 1, 2, 4, 8, 16, 40], "32 would crowd 40");
        assert_eq!(iterations(1), [0, 1]);
        assert_eq!(iterations(0), [0]);
    }

    #[test]
    fn panel_titles_name_the_token_and_its_position() {
        assert_eq!(panel_title("13 \"<1\""), "token \"<1\" at position 13");
        assert_eq!(panel_title("0 #13"), "token id 13 at position 0");
        assert_eq!(panel_title("2 \" the\""), "token \" the\" at position 2");
        assert_eq!(panel_title("custom"), "custom");
        assert_eq!(panel_title("x #3"), "x #3");
    }
}
