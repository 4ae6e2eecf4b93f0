//! The chains demo: randomized-depth training on k-hop variable chains against a non-recurrent
//! baseline, accuracy against test-time depth, adaptive exit by difficulty, latent dynamics.
//!
//! Why chains rather than addition: the answer is one token whose difficulty (hops) is set
//! independently of the sequence length, and each pass through the core can follow about one
//! assignment, so the depth a question needs is known and the right answer is out of reach of
//! a shallow pass (guessing among the context's digits gives 25-35%).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use infer::adaptive::{AdaptiveConfig, generate_batch};
use infer::exit::Criterion;
use infer::greedy::WarmStart;
use infer::strategy::Strategy;
use model::Huginn;
use model::burn::prelude::*;
use serde_json::{Value, json};
use train::chains::{self, ChainTask, Split};
use train::data::DataConfig;

use crate::common::{Accuracies, Probe, Recipe, accuracy_by_depth, at_depth, task_report, train_both};
use crate::report;

/// The demo's sizes and recipe (experiments.md, task A).
#[derive(Debug, Clone)]
pub struct ChainsDemo {
    pub recipe: Recipe,
    /// Batches over which the most hops of a training chain ramps from 1 to 6.
    pub curriculum: u64,
    /// Rows per hop count for the difficulty curves.
    pub rows_per_hop: usize,
    pub probe: Probe,
}

impl ChainsDemo {
    pub fn full() -> Self {
        Self {
            recipe: Recipe {
                seed: 0,
                steps: 2000,
                width: 64,
                heads: 4,
                layers: (1, 2, 1),
                mean_depth: 6,
                backprop: 3,
                batch_size: 32,
                lr: 2e-3,
                eval_rows: 512,
            },
            curriculum: 800,
            rows_per_hop: 128,
            probe: Probe::standard(),
        }
    }

    pub fn quick() -> Self {
        let full = Self::full();
        Self {
            recipe: full.recipe.quick(),
            curriculum: 10,
            rows_per_hop: 8,
            probe: full.probe.quick(),
        }
    }
}

/// Zero-shot adaptive exit on the answer token: each question runs until its own criterion
/// fires (reference semantics, as `huginn generate` does). Returns steps used and correctness.
fn adaptive(
    model: &Huginn,
    examples: &[chains::Example],
    exit: (Criterion, f64),
    max_steps: usize,
) -> Result<Vec<(usize, bool)>> {
    let config = AdaptiveConfig {
        criterion: exit.0,
        threshold: exit.1,
        max_steps,
        warm_start: WarmStart::Cold,
        strategy: Strategy::default(),
    };
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(128) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.tokens[..chains::LEN - 1].to_vec()).collect();
        let rows = generate_batch(model, &prompts, 1, config).context("adaptive exit")?;
        for (row, e) in rows.iter().zip(chunk) {
            out.push((row.steps_per_token[0], row.tokens[0] == e.answer));
        }
    }
    Ok(out)
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

pub fn run(config: &ChainsDemo, out: &Path, device: &Device, progress: bool, started: Instant) -> Result<()> {
    let recipe = &config.recipe;
    let data = DataConfig::Chains {
        seed: recipe.seed,
        curriculum: config.curriculum,
    };
    let trained = train_both(
        recipe,
        (chains::VOCAB_SIZE, chains::TRAIN_LEN, data),
        out,
        device,
        progress,
    )?;
    let (recurrent, baseline) = (&trained.recurrent, &trained.baseline);

    // Held-out sets: unseen chains of the training depths, and deeper ones.
    let task = ChainTask { seed: recipe.seed };
    let rows = recipe.eval_rows as u64;
    let test: Vec<_> = (0..rows).map(|i| task.example(Split::Test, i)).collect();
    let harder: Vec<_> = (0..rows).map(|i| task.example(Split::Harder, i)).collect();
    let per_hop: Vec<(usize, Vec<chains::Example>)> = (1..=10)
        .map(|h| {
            let split = if h <= 6 { Split::Test } else { Split::Harder };
            let examples = (0..config.rows_per_hop as u64)
                .map(|i| task.example_with_hops(split, h, i))
                .collect();
            (h, examples)
        })
        .collect();

    let depths = &config.probe.depths;
    let bar = progress_bar(
        progress,
        (depths.len() * (4 + per_hop.len())) as u64,
        "evaluating at each depth",
    );
    let accuracy = [&test, &harder].map(|set| accuracy_by_depth(recurrent, set, chains::PAD, depths, &bar));
    let baseline_accuracy = [&test, &harder].map(|set| accuracy_by_depth(baseline, set, chains::PAD, depths, &bar));
    let hop_accuracy: Vec<(usize, Vec<f64>)> = per_hop
        .iter()
        .map(|(h, set)| (*h, accuracy_by_depth(recurrent, set, chains::PAD, depths, &bar)))
        .collect();
    bar.finish_and_clear();

    // Zero-shot adaptive exit, per difficulty and on the in-distribution test set.
    let bar = progress_bar(
        progress,
        (config.probe.exits.len() * (per_hop.len() + 1)) as u64,
        "adaptive exit",
    );
    let fixed32 = at_depth(depths, &accuracy[0], 32);
    let mut exits = Vec::new();
    for &exit in &config.probe.exits {
        let mut steps_by_level = BTreeMap::new();
        let mut all_steps = Vec::new();
        for (h, set) in &per_hop {
            let results = adaptive(recurrent, set, exit, config.probe.exit_max_steps)?;
            let mean = results.iter().map(|r| r.0 as f64).sum::<f64>() / results.len() as f64;
            steps_by_level.insert(*h, mean);
            all_steps.extend(results.iter().map(|r| r.0));
            bar.inc(1);
        }
        let on_test = adaptive(recurrent, &test, exit, config.probe.exit_max_steps)?;
        bar.inc(1);
        let accuracy = on_test.iter().filter(|r| r.1).count() as f64 / on_test.len() as f64;
        let mean_steps = on_test.iter().map(|r| r.0 as f64).sum::<f64>() / on_test.len() as f64;
        let levels: Vec<f64> = steps_by_level.keys().map(|h| *h as f64).collect();
        let means: Vec<f64> = steps_by_level.values().copied().collect();
        exits.push(ExitResult {
            criterion: exit.0,
            threshold: exit.1,
            accuracy,
            fixed32_accuracy: fixed32,
            mean_steps,
            steps_by_level,
            spearman: spearman(&levels, &means),
            all_steps,
        });
    }
    bar.finish_and_clear();

    let accuracies = Accuracies {
        depths,
        recurrent: accuracy,
        baseline: baseline_accuracy,
        by_level: hop_accuracy,
    };
    let mut report = task_report(
        "chains",
        "hops",
        &accuracies,
        &exits,
        &trained,
        recipe,
        json!({"curriculum": config.curriculum, "rows_per_hop": config.rows_per_hop}),
    );

    // The latent dynamics of one deep, held-out question.
    let example = task.example_with_hops(Split::Harder, 8, 0);
    let names = report::Figures {
        title: "Recurrent depth on k-hop variable chains",
        level: "hops",
        trained: "hops 1-6".into(),
        harder: "hops 7-10".into(),
        prompt: example.tokens[..chains::LEN - 1].to_vec(),
    };
    report::task_figures(&names, out, recurrent, &accuracies, &exits, progress, &mut report)?;
    report["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    report::write_json(out, &report)?;
    print_summary(&accuracies, &exits);
    Ok(())
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
