//! Accuracy against compute: each task's fixed-depth curve (accuracy at r steps per token)
//! with its exit criteria as points beside it (accuracy at the mean steps they took), steps on
//! a log₂ axis, as the paper plots adaptive compute.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::depth::{legend, log2_chart};
use super::{DrawError, Figure, Images, categorical, padded, save};
use crate::AnalysisError;
use crate::eval_report::TaskResults;

pub struct ComputeFigure<'a> {
    pub title: &'a str,
    pub tasks: &'a [TaskResults],
}

impl Figure for ComputeFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (860, 540)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let steps = || {
            self.tasks.iter().flat_map(|t| {
                let fixed = t.depths.iter().map(|(d, _)| *d as f64);
                fixed.chain(t.exits.iter().map(|(_, s, _)| *s))
            })
        };
        let lo = steps().fold(f64::INFINITY, f64::min);
        let hi = steps().fold(1.0, f64::max);
        let accuracies = self.tasks.iter().flat_map(|t| {
            let fixed = t.depths.iter().map(|(_, a)| *a);
            fixed.chain(t.exits.iter().map(|(_, _, a)| *a))
        });
        let (y0, y1) = padded(accuracies);
        let axes = ("mean recurrence steps per token (log₂ scale)", "accuracy");
        let mut chart = log2_chart(root, self.title, (lo, hi), (y0, y1), axes)?;
        // Curves take the first colours, exit points the ones after them.
        let mut next_colour = self.tasks.len();
        for (t, task) in self.tasks.iter().enumerate() {
            let colour = categorical(t);
            let curve: Vec<(f64, f64)> = task.depths.iter().map(|(d, a)| (*d as f64, *a)).collect();
            chart
                .draw_series(LineSeries::new(curve, colour.stroke_width(2)).point_size(4))?
                .label(format!("{}: fixed depth", task.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            for (label, steps, acc) in &task.exits {
                let style = categorical(next_colour).filled();
                next_colour += 1;
                chart
                    .draw_series(std::iter::once(TriangleMarker::new((*steps, *acc), 9, style)))?
                    .label(format!("{}: exit {label}", task.name))
                    .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 7, style));
            }
        }
        legend(&mut chart)
    }
}

/// Writes accuracy against mean steps per token for `tasks` to `<base>.png|svg`.
pub fn plot_accuracy_against_compute(base: &Path, title: &str, tasks: &[TaskResults]) -> Result<Images, AnalysisError> {
    if tasks.iter().all(|t| t.depths.is_empty() && t.exits.is_empty()) {
        return Err(AnalysisError::Invalid("no results to plot".into()));
    }
    save(&ComputeFigure { title, tasks }, base)
}
