//! Accuracy against compute: each task's fixed-depth curve (accuracy at r steps per token)
//! with its exit criteria as points beside it (accuracy at the mean steps they took), steps on
//! a log₂ axis, as the paper plots adaptive compute.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{DrawError, Figure, Images, categorical, padded, save, text};
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
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, text(20.0))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d((lo / 1.25..hi * 1.25).log_scale().base(2.0), y0..y1)?;
        chart
            .configure_mesh()
            .x_desc("mean recurrence steps per token (log₂ scale)")
            .y_desc("accuracy")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(text(12.0))
            .axis_desc_style(text(14.0))
            .draw()?;
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

/// Writes accuracy against mean steps per token for `tasks` to `<base>.png|svg`.
pub fn plot_accuracy_against_compute(base: &Path, title: &str, tasks: &[TaskResults]) -> Result<Images, AnalysisError> {
    if tasks.iter().all(|t| t.depths.is_empty() && t.exits.is_empty()) {
        return Err(AnalysisError::Invalid("no results to plot".into()));
    }
    save(&ComputeFigure { title, tasks }, base)
}
