//! What the task demos share: the training recipe, training the recurrent model and its
//! non-recurrent baseline, and the layout of `report.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use indicatif::ProgressBar;
use infer::exit::Criterion;
use model::burn::prelude::*;
use model::{Huginn, HuginnConfig};
use serde_json::{Value, json};
use train::batch::{TaskExample, make_batch};
use train::data::DataConfig;
use train::depth::DepthScheme;
use train::monitor::evaluate;
use train::run::{OptimizerConfig, RunConfig, Trainer};
use train::schedule::Schedule;

use crate::chains::{ExitResult, by_depth};

/// Model shape and training recipe: randomized depth (Poisson-lognormal, mean r̄, backprop k),
/// AdamW with a warmup and cosine decay, clipping at 1.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub seed: u64,
    pub steps: u64,
    pub width: usize,
    pub heads: usize,
    pub layers: (usize, usize, usize),
    pub mean_depth: usize,
    pub backprop: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Rows of each evaluation set.
    pub eval_rows: usize,
}

impl Recipe {
    /// Tiny sizes for `--quick`.
    pub fn quick(self) -> Self {
        Self {
            steps: 20,
            width: 16,
            heads: 2,
            layers: (1, 1, 1),
            mean_depth: 2,
            backprop: 1,
            batch_size: 8,
            eval_rows: 32,
            ..self
        }
    }

    fn run_config(&self, vocab: usize, context: usize, data: DataConfig, depth: DepthScheme) -> RunConfig {
        let mut model = HuginnConfig::tiny(vocab, self.width, self.heads, self.layers);
        model.block_size = context;
        model.mean_recurrence = self.mean_depth;
        model.mean_backprop_depth = self.backprop;
        RunConfig {
            model,
            data,
            seed: self.seed,
            steps: self.steps,
            batch_size: self.batch_size,
            accumulation: 1,
            depth,
            optimizer: OptimizerConfig::AdamW {
                beta_1: 0.9,
                beta_2: 0.95,
                epsilon: 1e-8,
                weight_decay: 0.01,
            },
            schedule: Schedule::Cosine {
                peak_lr: self.lr,
                warmup: (self.steps / 20).max(1),
                total_steps: self.steps,
                min_lr: self.lr / 10.0,
            },
            max_grad_norm: Some(1.0),
            eval_every: (self.steps / 4).max(1),
            eval_rows: self.eval_rows.min(256),
            eval_depths: vec![1, self.mean_depth + 1, 4 * (self.mean_depth + 1)],
            checkpoint_every: (self.steps / 4).max(1),
            keep_checkpoints: 1,
        }
    }

    fn json(&self) -> Value {
        json!({
            "steps": self.steps, "width": self.width, "heads": self.heads,
            "layers": [self.layers.0, self.layers.1, self.layers.2],
            "mean_depth": self.mean_depth, "backprop": self.backprop,
            "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed, "eval_rows": self.eval_rows,
        })
    }
}

/// How a trained model is measured: the test-time depths and the zero-shot exit rules, each
/// allowed up to `exit_max_steps` steps per token.
#[derive(Debug, Clone)]
pub struct Probe {
    pub depths: Vec<usize>,
    pub exits: Vec<(Criterion, f64)>,
    pub exit_max_steps: usize,
}

impl Probe {
    /// Depths 1-64; the reference's latent-diff (0.03) and KL (10⁻³) rules, and a stricter
    /// latent-diff (0.01).
    pub fn standard() -> Self {
        Self {
            depths: vec![1, 2, 4, 8, 16, 32, 64],
            exits: vec![
                (Criterion::LatentDiff, 0.03),
                (Criterion::Kl, 1e-3),
                (Criterion::LatentDiff, 0.01),
            ],
            exit_max_steps: 64,
        }
    }

    /// Fewer exit steps for `--quick`.
    pub fn quick(self) -> Self {
        Self {
            exit_max_steps: 16,
            ..self
        }
    }
}

/// Exact-match accuracy of `model` on `examples` (padded with `pad`) at each depth.
pub fn accuracy_by_depth<E: TaskExample>(
    model: &Huginn,
    examples: &[E],
    pad: u32,
    depths: &[usize],
    bar: &ProgressBar,
) -> Vec<f64> {
    let batch = make_batch(examples, pad, &model.device());
    depths
        .iter()
        .map(|&d| {
            bar.inc(1);
            evaluate(model, &batch, d, true).accuracy.expect("tasks are scored")
        })
        .collect()
}

/// The two trained models of a demo, without autodiff.
pub struct Trained {
    pub recurrent: Huginn,
    pub baseline: Huginn,
    pub train_mean_depth: f64,
}

/// Trains the recurrent model in `out/recurrent` and the same-size model at depth 1, on the
/// same number of steps, in `out/baseline`.
pub fn train_both(
    recipe: &Recipe,
    (vocab, context, data): (usize, usize, DataConfig),
    out: &Path,
    device: &Device,
    progress: bool,
) -> Result<Trained> {
    let recurrent = DepthScheme::PoissonLognormalFilling {
        mean: recipe.mean_depth,
        backprop: recipe.backprop,
    };
    let mut models = Vec::new();
    for (depth, dir, label) in [
        (recurrent, "recurrent", "the recurrent model"),
        (DepthScheme::NonRecurrent, "baseline", "the non-recurrent baseline"),
    ] {
        let dir = out.join(dir);
        if progress {
            eprintln!("training {label} ({} steps) → {}", recipe.steps, dir.display());
        }
        let config = recipe.run_config(vocab, context, data.clone(), depth);
        let mut trainer = Trainer::create(&dir, config, &device.clone().autodiff())?;
        trainer.run(None, progress)?;
        models.push(trainer.model());
    }
    let baseline = models.pop().expect("two models");
    let recurrent_model = models.pop().expect("two models");
    Ok(Trained {
        recurrent: recurrent_model,
        baseline,
        train_mean_depth: recurrent.mean_depth(),
    })
}

/// Accuracies of a demo: `[in distribution, harder]` per depth for both models, and the
/// recurrent model's per difficulty level.
pub struct Accuracies<'a> {
    pub depths: &'a [usize],
    pub recurrent: [Vec<f64>; 2],
    pub baseline: [Vec<f64>; 2],
    pub by_level: Vec<(usize, Vec<f64>)>,
}

/// The accuracy at depth `depth` of a by-depth list (NaN when that depth was not probed).
pub fn at_depth(depths: &[usize], accuracy: &[f64], depth: usize) -> f64 {
    depths
        .iter()
        .position(|d| *d == depth)
        .map_or(f64::NAN, |i| accuracy[i])
}

/// The rule `report.json` leads with: the one that spends the fewest steps among those within
/// 2 points of fixed depth 32 (what a user tuning the threshold would pick), else the most
/// accurate.
pub fn headline(exits: &[ExitResult]) -> &ExitResult {
    exits
        .iter()
        .filter(|e| e.accuracy >= e.fixed32_accuracy - 0.02)
        .min_by(|a, b| a.mean_steps.total_cmp(&b.mean_steps))
        .or_else(|| exits.iter().max_by(|a, b| a.accuracy.total_cmp(&b.accuracy)))
        .expect("at least one exit rule")
}

/// `report.json` of a task demo (the figures and wall time are added later).
pub fn task_report(
    task: &str,
    difficulty: &str,
    accuracies: &Accuracies,
    exits: &[ExitResult],
    trained: &Trained,
    recipe: &Recipe,
    extra_config: Value,
) -> Value {
    let depths = accuracies.depths;
    let exit_json = |e: &ExitResult| {
        json!({
            "criterion": e.criterion.name(),
            "threshold": e.threshold,
            "accuracy": e.accuracy,
            "fixed32_accuracy": e.fixed32_accuracy,
            "mean_steps": e.mean_steps,
            "mean_steps_by_difficulty": e.steps_by_level.iter().map(|(h, m)| (h.to_string(), *m)).collect::<BTreeMap<_, _>>(),
            "spearman_steps_vs_difficulty": e.spearman,
        })
    };
    let mut config = recipe.json();
    if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra_config) {
        config.extend(extra);
    }
    json!({
        "task": task,
        "difficulty": difficulty,
        "accuracy_by_depth": {
            "in_distribution": by_depth(depths, &accuracies.recurrent[0]),
            "harder": by_depth(depths, &accuracies.recurrent[1]),
        },
        "baseline_accuracy_by_depth": {
            "in_distribution": by_depth(depths, &accuracies.baseline[0]),
            "harder": by_depth(depths, &accuracies.baseline[1]),
        },
        "accuracy_by_difficulty_and_depth": accuracies.by_level.iter().map(|(h, a)| (h.to_string(), by_depth(depths, a))).collect::<BTreeMap<_, _>>(),
        "adaptive_exit": exit_json(headline(exits)),
        "adaptive_exit_rules": exits.iter().map(exit_json).collect::<Vec<_>>(),
        "train_mean_depth": trained.train_mean_depth,
        "config": config,
    })
}
