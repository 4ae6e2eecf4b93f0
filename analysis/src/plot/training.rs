//! Training curves from a run's metrics: per held-out split, the training loss and the
//! evaluation loss at every evaluated depth against the optimizer step (log scale), and the
//! exact-match accuracy at every depth next to it when the split records one.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{DrawError, Figure, Images, save, sequential, text, tick};
use crate::AnalysisError;
use crate::curves::{EvalCurve, TrainingCurves};

pub struct TrainingFigure<'a> {
    pub title: &'a str,
    pub curves: &'a TrainingCurves,
}

const PANEL: (u32, u32) = (640, 400);

impl TrainingFigure<'_> {
    fn rows(&self) -> usize {
        self.curves.splits().len().max(1)
    }

    fn columns(&self) -> usize {
        if self.curves.has_accuracy() { 2 } else { 1 }
    }

    fn steps(&self) -> (f64, f64) {
        let c = self.curves;
        let steps = c
            .train_loss
            .iter()
            .map(|p| p.0)
            .chain(c.eval.iter().flat_map(|e| e.loss.iter().map(|p| p.0)));
        let (lo, hi) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        if lo >= hi {
            (lo.min(hi) as f64 - 0.5, hi as f64 + 0.5)
        } else {
            (lo as f64, hi as f64)
        }
    }
}

impl Figure for TrainingFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (PANEL.0 * self.columns() as u32, PANEL.1 * self.rows() as u32 + 44)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawError> {
        let root = root.titled(self.title, text(20.0))?;
        let panels = root.split_evenly((self.rows(), self.columns()));
        let splits = self.curves.splits();
        let split_names: Vec<Option<&str>> = if splits.is_empty() {
            vec![None]
        } else {
            splits.into_iter().map(Some).collect()
        };
        for (row, split) in split_names.into_iter().enumerate() {
            let curves: Vec<&EvalCurve> = self
                .curves
                .eval
                .iter()
                .filter(|c| Some(c.split.as_str()) == split)
                .collect();
            self.loss_panel(&panels[row * self.columns()], split, &curves)?;
            if self.columns() == 2 {
                self.accuracy_panel(&panels[row * 2 + 1], split, &curves)?;
            }
        }
        Ok(())
    }
}

/// Colour of the `i`-th of `n` depths (dark shallow to bright deep, short of viridis' pale
/// yellow end, which vanishes on white).
fn depth_colour(i: usize, n: usize) -> RGBColor {
    sequential(0.85 * i as f64 / (n.max(2) - 1) as f64)
}

impl TrainingFigure<'_> {
    fn loss_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        split: Option<&str>,
        curves: &[&EvalCurve],
    ) -> Result<(), DrawError> {
        let positive = self
            .curves
            .train_loss
            .iter()
            .map(|p| p.1)
            .chain(curves.iter().flat_map(|c| c.loss.iter().map(|p| p.1)))
            .filter(|v| *v > 0.0 && v.is_finite());
        let (lo, hi) = positive.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo <= hi { (lo / 1.25, hi * 1.25) } else { (0.1, 10.0) };
        let (s0, s1) = self.steps();
        let caption = match split {
            Some(s) => format!("loss ({s} split)"),
            None => "training loss".to_string(),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(caption, text(16.0))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(s0..s1, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_labels(6)
            .y_label_formatter(&tick)
            .light_line_style(WHITE)
            .label_style(text(12.0))
            .axis_desc_style(text(14.0))
            .draw()?;
        let grey = RGBColor(150, 150, 150);
        let train = self
            .curves
            .train_loss
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(s, l)| (s as f64, l));
        chart
            .draw_series(LineSeries::new(train, grey.stroke_width(1)))?
            .label("train")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
        for (i, c) in curves.iter().enumerate() {
            let colour = depth_colour(i, curves.len());
            let points = c.loss.iter().filter(|p| p.1 > 0.0).map(|&(s, l)| (s as f64, l));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)).point_size(3))?
                .label(format!("eval, depth {}", c.depth))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font(text(12.0))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        Ok(())
    }

    fn accuracy_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        split: Option<&str>,
        curves: &[&EvalCurve],
    ) -> Result<(), DrawError> {
        let (s0, s1) = self.steps();
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("exact-match accuracy ({} split)", split.unwrap_or_default()),
                text(16.0),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(s0..s1, -0.02..1.02)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("accuracy")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .label_style(text(12.0))
            .axis_desc_style(text(14.0))
            .draw()?;
        for (i, c) in curves.iter().enumerate().filter(|(_, c)| !c.accuracy.is_empty()) {
            let colour = depth_colour(i, curves.len());
            let points = c.accuracy.iter().map(|&(s, a)| (s as f64, a));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)).point_size(3))?
                .label(format!("depth {}", c.depth))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font(text(12.0))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        Ok(())
    }
}

/// Writes the training curves of a run to `<base>.png|svg`.
pub fn plot_training_curves(base: &Path, title: &str, curves: &TrainingCurves) -> Result<Images, AnalysisError> {
    if curves.train_loss.is_empty() && curves.eval.is_empty() {
        return Err(AnalysisError::Invalid(
            "the metrics hold no training or evaluation records".into(),
        ));
    }
    save(&TrainingFigure { title, curves }, base)
}
