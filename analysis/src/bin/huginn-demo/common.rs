//! What the task demos share: the training recipe, training the recurrent model and its
//! non-recurrent baseline, and the layout of `report.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use infer::adaptive::AdaptiveConfig;
use infer::exit::Criterion;
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::burn::prelude::*;
use model::{Huginn, HuginnConfig};
use serde_json::{Value, json};
use train::batch::{TaskExample, make_batch};
use train::data::DataConfig;
use train::depth::DepthScheme;
use train::monitor::evaluate_depths;
use train::run::{OptimizerConfig, RunConfig, Trainer};
use train::schedule::Schedule;

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
            init_from: None,
            devices: Vec::new(),
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
    let accuracy = evaluate_depths(model, &batch, depths, true)
        .iter()
        .map(|e| e.accuracy.expect("tasks are scored"))
        .collect();
    bar.inc(depths.len() as u64);
    accuracy
}

/// The two trained models of a demo, without autodiff.
pub struct Trained {
    pub recurrent: Huginn,
    pub baseline: Huginn,
    pub train_mean_depth: f64,
}

/// Trains the recurrent model in `out/recurrent` and the same-size model at depth 1, on the
/// same number of steps, in `out/baseline`. The two runs share nothing, so the baseline trains
/// on a thread of its own beside the recurrent model (whose progress is shown): Burn's CPU
/// backend keeps about one core busy with these small products, and the machine has two.
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
    let train = |depth: DepthScheme, dir: &str, progress: bool| -> Result<Huginn> {
        let config = recipe.run_config(vocab, context, data.clone(), depth);
        let mut trainer = Trainer::create(&out.join(dir), config, &device.clone().autodiff())?;
        trainer.run(None, progress)?;
        Ok(trainer.model())
    };
    if progress {
        eprintln!(
            "training the recurrent model and, alongside, the non-recurrent baseline ({} steps each) → {}",
            recipe.steps,
            out.display()
        );
    }
    let (recurrent_model, baseline) = std::thread::scope(|scope| {
        let baseline = scope.spawn(|| train(DepthScheme::NonRecurrent, "baseline", false));
        let recurrent_model = train(recurrent, "recurrent", progress);
        let baseline = baseline
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the baseline's training panicked")));
        (recurrent_model, baseline)
    });
    Ok(Trained {
        recurrent: recurrent_model?,
        baseline: baseline?,
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
    /// Questions behind each split's accuracies (in distribution, harder): what a spread across
    /// seeds needs to tell a gain from sampling noise.
    pub questions: [usize; 2],
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
        "questions": {
            "in_distribution": accuracies.questions[0],
            "harder": accuracies.questions[1],
        },
        "accuracy_by_difficulty_and_depth": accuracies.by_level.iter().map(|(h, a)| (h.to_string(), by_depth(depths, a))).collect::<BTreeMap<_, _>>(),
        "adaptive_exit": exit_json(headline(exits)),
        "adaptive_exit_rules": exits.iter().map(exit_json).collect::<Vec<_>>(),
        "train_mean_depth": trained.train_mean_depth,
        "config": config,
    })
}

/// Spearman's rank correlation (average ranks for ties).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in i..=j {
                r[idx[k]] = (i + j) as f64 / 2.0 + 1.0;
            }
            i = j + 1;
        }
        r
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(&rx), mean(&ry));
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let var = |v: &[f64], m: f64| v.iter().map(|a| (a - m).powi(2)).sum::<f64>();
    let denominator = (var(&rx, mx) * var(&ry, my)).sqrt();
    if denominator == 0.0 { 0.0 } else { cov / denominator }
}

pub fn by_depth(depths: &[usize], values: &[f64]) -> Value {
    let map: BTreeMap<String, f64> = depths.iter().zip(values).map(|(d, v)| (d.to_string(), *v)).collect();
    json!(map)
}

/// One exit rule's results.
pub struct ExitResult {
    pub criterion: Criterion,
    pub threshold: f64,
    pub accuracy: f64,
    /// Accuracy at a fixed 32 steps on the same questions.
    pub fixed32_accuracy: f64,
    pub mean_steps: f64,
    /// Mean steps per answer by difficulty level (hops, carry-chain length).
    pub steps_by_level: BTreeMap<usize, f64>,
    pub spearman: f64,
    /// Steps used by every question of every difficulty (for histograms).
    pub all_steps: Vec<usize>,
}

pub fn progress_bar(visible: bool, len: u64, message: &'static str) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(message);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} · ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

pub fn print_summary(accuracies: &Accuracies, exits: &[ExitResult]) {
    let (depths, accuracy, baseline) = (accuracies.depths, &accuracies.recurrent, &accuracies.baseline);
    println!("\naccuracy (exact match) by test-time depth r");
    println!(
        "{:>5} {:>12} {:>12} {:>14} {:>14}",
        "r", "recurrent", "rec. harder", "baseline", "base. harder"
    );
    for (i, d) in depths.iter().enumerate() {
        println!(
            "{:>5} {:>11.1}% {:>11.1}% {:>13.1}% {:>13.1}%",
            d,
            100.0 * accuracy[0][i],
            100.0 * accuracy[1][i],
            100.0 * baseline[0][i],
            100.0 * baseline[1][i]
        );
    }
    for e in exits {
        println!(
            "adaptive exit {} < {}: accuracy {:.1}% (fixed r=32: {:.1}%), mean steps {:.1}, by difficulty {}, Spearman ρ {:.2}",
            e.criterion.name(),
            e.threshold,
            100.0 * e.accuracy,
            100.0 * e.fixed32_accuracy,
            e.mean_steps,
            e.steps_by_level
                .iter()
                .map(|(h, m)| format!("{h}:{m:.1}"))
                .collect::<Vec<_>>()
                .join(" "),
            e.spearman
        );
    }
}

/// A zero-shot exit rule `(criterion, threshold)` with the reference's semantics: a cold start
/// for every token, the default cache strategy, at most `max_steps` iterations.
pub fn exit_config((criterion, threshold): (Criterion, f64), max_steps: usize) -> AdaptiveConfig {
    AdaptiveConfig {
        criterion,
        threshold,
        max_steps,
        warm_start: WarmStart::Cold,
        strategy: Strategy::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::spearman;

    #[test]
    fn spearman_ranks_with_ties() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 25.0, 90.0]), 1.0);
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
        let rho = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0, 2.0, 3.0]);
        assert!((rho - 0.9486832980505138).abs() < 1e-12, "{rho}");
    }
}
