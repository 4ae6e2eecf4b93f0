//! The series behind the training plots, gathered from a run's `metrics.jsonl` records: the
//! training loss over steps, every evaluated (split, depth) over steps, and the final
//! evaluation as a function of test-time depth.

use std::path::Path;

use train::metrics::Record;

use crate::AnalysisError;

/// One held-out split evaluated at one depth over training.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalCurve {
    pub split: String,
    pub depth: usize,
    pub loss: Vec<(u64, f64)>,
    /// Empty for splits scored by loss only (text).
    pub accuracy: Vec<(u64, f64)>,
}

/// Which evaluation number to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Loss,
    Accuracy,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Loss => "loss",
            Metric::Accuracy => "accuracy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainingCurves {
    pub train_loss: Vec<(u64, f64)>,
    /// By split in order of first appearance, then by depth.
    pub eval: Vec<EvalCurve>,
}

impl TrainingCurves {
    pub fn from_records(records: &[Record]) -> Self {
        let mut curves = Self::default();
        let mut splits: Vec<String> = Vec::new();
        for record in records {
            match record {
                Record::Train { step, loss, .. } => curves.train_loss.push((*step, *loss)),
                Record::Eval {
                    step,
                    split,
                    depth,
                    loss,
                    accuracy,
                } => {
                    if !splits.contains(split) {
                        splits.push(split.clone());
                    }
                    let curve = match curves
                        .eval
                        .iter_mut()
                        .position(|c| c.split == *split && c.depth == *depth)
                    {
                        Some(i) => &mut curves.eval[i],
                        None => {
                            curves.eval.push(EvalCurve {
                                split: split.clone(),
                                depth: *depth,
                                loss: Vec::new(),
                                accuracy: Vec::new(),
                            });
                            curves.eval.last_mut().expect("just pushed")
                        }
                    };
                    curve.loss.push((*step, *loss));
                    if let Some(a) = accuracy {
                        curve.accuracy.push((*step, *a));
                    }
                }
                Record::Monitor { .. } => {}
            }
        }
        let rank = |s: &str| splits.iter().position(|x| x == s);
        curves.eval.sort_by_key(|c| (rank(&c.split), c.depth));
        curves
    }

    /// Reads `metrics.jsonl`, or the one in a run directory.
    pub fn read(path: &Path) -> Result<Self, AnalysisError> {
        let file = if path.is_dir() {
            path.join("metrics.jsonl")
        } else {
            path.to_path_buf()
        };
        let records = train::metrics::read(&file)?;
        Ok(Self::from_records(&records))
    }

    /// The splits, in order.
    pub fn splits(&self) -> Vec<&str> {
        let mut splits: Vec<&str> = Vec::new();
        for c in &self.eval {
            if !splits.contains(&c.split.as_str()) {
                splits.push(&c.split);
            }
        }
        splits
    }

    /// Whether any evaluation recorded an accuracy.
    pub fn has_accuracy(&self) -> bool {
        self.eval.iter().any(|c| !c.accuracy.is_empty())
    }

    /// For each split, `metric` against depth at the split's last evaluated step (a split
    /// without that metric is left out).
    pub fn by_depth(&self, metric: Metric) -> Vec<(String, Vec<(usize, f64)>)> {
        self.splits()
            .into_iter()
            .filter_map(|split| {
                let curves: Vec<&EvalCurve> = self.eval.iter().filter(|c| c.split == split).collect();
                let series = |c: &EvalCurve| match metric {
                    Metric::Loss => c.loss.clone(),
                    Metric::Accuracy => c.accuracy.clone(),
                };
                let last = curves.iter().flat_map(|c| series(c)).map(|(step, _)| step).max()?;
                let points: Vec<(usize, f64)> = curves
                    .iter()
                    .filter_map(|c| {
                        series(c)
                            .iter()
                            .find(|(step, _)| *step == last)
                            .map(|(_, v)| (c.depth, *v))
                    })
                    .collect();
                Some((format!("{split} (step {last})"), points))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(step: u64, split: &str, depth: usize, loss: f64, accuracy: Option<f64>) -> Record {
        Record::Eval {
            step,
            split: split.into(),
            depth,
            loss,
            accuracy,
        }
    }

    #[test]
    fn groups_records_into_curves_and_reads_the_final_evaluation_by_depth() {
        let train = |step: u64, loss: f64| Record::Train {
            step,
            loss,
            lr: 1e-3,
            grad_norm: 1.0,
            recurrence: 4,
            backprop: 2,
            tokens_per_second: 1.0,
            elapsed_seconds: 1.0,
        };
        let records = vec![
            train(1, 3.0),
            eval(1, "test", 4, 2.5, Some(0.1)),
            eval(1, "test", 1, 2.9, Some(0.0)),
            eval(1, "harder", 1, 3.1, Some(0.0)),
            Record::Monitor {
                step: 1,
                depth: 4,
                relative_residual: 0.1,
                token_correlation: 0.2,
            },
            train(2, 2.0),
            eval(2, "test", 1, 2.0, Some(0.2)),
            eval(2, "test", 4, 1.0, Some(0.9)),
            eval(2, "harder", 1, 3.0, Some(0.05)),
        ];
        let c = TrainingCurves::from_records(&records);
        assert_eq!(c.train_loss, [(1, 3.0), (2, 2.0)]);
        let keys: Vec<(&str, usize)> = c.eval.iter().map(|e| (e.split.as_str(), e.depth)).collect();
        assert_eq!(keys, [("test", 1), ("test", 4), ("harder", 1)]);
        assert_eq!(c.eval[1].loss, [(1, 2.5), (2, 1.0)]);
        assert_eq!(c.splits(), ["test", "harder"]);
        assert!(c.has_accuracy());
        assert_eq!(
            c.by_depth(Metric::Accuracy),
            [
                ("test (step 2)".to_string(), vec![(1, 0.2), (4, 0.9)]),
                ("harder (step 2)".to_string(), vec![(1, 0.05)]),
            ]
        );
        let text = TrainingCurves::from_records(&[eval(5, "validation", 2, 4.0, None)]);
        assert!(!text.has_accuracy());
        assert!(text.by_depth(Metric::Accuracy).is_empty());
        assert_eq!(
            text.by_depth(Metric::Loss),
            [("validation (step 5)".to_string(), vec![(2, 4.0)])]
        );
    }
}
