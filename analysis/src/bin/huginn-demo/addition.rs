//! The addition demo: randomized-depth training on reversed-digit addition (operands padded to
//! a fixed width, so every question and answer has the same length) against the non-recurrent
//! baseline; accuracy against test-time depth, by longest carry chain, and zero-shot adaptive
//! exit on every answer digit.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use infer::adaptive::{AdaptiveConfig, generate_batch};
use infer::exit::Criterion;
use infer::greedy::WarmStart;
use infer::strategy::Strategy;
use model::burn::prelude::*;
use model::{Huginn, HuginnConfig};
use serde_json::json;
use train::addition::{self, AdditionTask, Example, Split};
use train::batch::make_batch;
use train::data::DataConfig;
use train::depth::DepthScheme;
use train::monitor::evaluate;
use train::run::{OptimizerConfig, RunConfig, Trainer};
use train::schedule::Schedule;

use crate::chains::{ExitResult, by_depth, print_summary, progress_bar, spearman};
use crate::report;

#[derive(Debug, Clone)]
pub struct AdditionDemo {
    pub seed: u64,
    pub steps: u64,
    pub max_digits: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: (usize, usize, usize),
    pub mean_depth: usize,
    pub backprop: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub eval_rows: usize,
    pub depths: Vec<usize>,
    pub exits: Vec<(Criterion, f64)>,
    pub exit_max_steps: usize,
}

impl AdditionDemo {
    pub fn full() -> Self {
        Self {
            seed: 0,
            steps: 1500,
            max_digits: 3,
            width: 64,
            heads: 4,
            layers: (1, 2, 1),
            mean_depth: 4,
            backprop: 2,
            batch_size: 32,
            lr: 2e-3,
            eval_rows: 512,
            depths: vec![1, 2, 4, 8, 16, 32, 64],
            exits: vec![(Criterion::LatentDiff, 0.03), (Criterion::Kl, 1e-3)],
            exit_max_steps: 64,
        }
    }

    pub fn quick() -> Self {
        Self {
            steps: 20,
            width: 16,
            heads: 2,
            layers: (1, 1, 1),
            mean_depth: 2,
            backprop: 1,
            batch_size: 8,
            eval_rows: 32,
            exit_max_steps: 16,
            ..Self::full()
        }
    }

    fn task(&self) -> AdditionTask {
        AdditionTask {
            seed: self.seed,
            max_digits: self.max_digits,
            padded: true,
        }
    }

    fn run_config(&self, depth: DepthScheme) -> RunConfig {
        let mut model = HuginnConfig::tiny(addition::VOCAB_SIZE, self.width, self.heads, self.layers);
        model.block_size = self.task().max_len(Split::Harder);
        model.mean_recurrence = self.mean_depth;
        model.mean_backprop_depth = self.backprop;
        RunConfig {
            model,
            data: DataConfig::Addition {
                seed: self.seed,
                max_digits: self.max_digits,
                padded: true,
            },
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
}

fn train(config: RunConfig, dir: &Path, device: &Device, progress: bool, label: &str) -> Result<Huginn> {
    if progress {
        eprintln!("training {label} ({} steps) → {}", config.steps, dir.display());
    }
    let mut trainer = Trainer::create(dir, config, &device.clone().autodiff())?;
    trainer.run(None, progress)?;
    Ok(trainer.model())
}

fn accuracy(model: &Huginn, examples: &[Example], depth: usize) -> f64 {
    let batch = make_batch(examples, addition::PAD, &model.device());
    evaluate(model, &batch, depth, true).accuracy.expect("tasks are scored")
}

/// Greedy answers under an exit rule: each answer digit (and the newline) exits on its own.
/// Returns, per example, the mean steps over its answer tokens and whether all were right.
fn adaptive(
    model: &Huginn,
    examples: &[Example],
    exit: (Criterion, f64),
    max_steps: usize,
) -> Result<Vec<(f64, bool)>> {
    let config = AdaptiveConfig {
        criterion: exit.0,
        threshold: exit.1,
        max_steps,
        warm_start: WarmStart::Cold,
        strategy: Strategy::default(),
    };
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(128) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.tokens[..e.answer_start].to_vec()).collect();
        let answer_len = chunk[0].tokens.len() - chunk[0].answer_start;
        let rows = generate_batch(model, &prompts, answer_len, config).context("adaptive exit")?;
        for (row, e) in rows.iter().zip(chunk) {
            let steps = row.steps_per_token.iter().sum::<usize>() as f64 / row.steps_per_token.len() as f64;
            out.push((steps, row.tokens[..] == e.tokens[e.answer_start..]));
        }
    }
    Ok(out)
}

pub fn run(config: &AdditionDemo, out: &Path, device: &Device, progress: bool, started: Instant) -> Result<()> {
    let recurrent_config = config.run_config(DepthScheme::PoissonLognormalFilling {
        mean: config.mean_depth,
        backprop: config.backprop,
    });
    let train_mean_depth = recurrent_config.depth.mean_depth();
    let recurrent = train(
        recurrent_config,
        &out.join("recurrent"),
        device,
        progress,
        "the recurrent model",
    )?;
    let baseline = train(
        config.run_config(DepthScheme::NonRecurrent),
        &out.join("baseline"),
        device,
        progress,
        "the non-recurrent baseline",
    )?;

    let task = config.task();
    let rows = config.eval_rows as u64;
    let test: Vec<_> = (0..rows).map(|i| task.example(Split::Test, i)).collect();
    let harder: Vec<_> = (0..rows).map(|i| task.example(Split::Harder, i)).collect();
    // Difficulty: the longest run of carries, over the in-distribution test examples.
    let mut by_chain: BTreeMap<usize, Vec<Example>> = BTreeMap::new();
    for e in &test {
        by_chain.entry(e.carry_chain).or_default().push(e.clone());
    }

    let depths = &config.depths;
    let bar = progress_bar(
        progress,
        (depths.len() * (4 + by_chain.len())) as u64,
        "evaluating at each depth",
    );
    let at_depths = |model: &Huginn, set: &[Example]| -> Vec<f64> {
        depths
            .iter()
            .map(|&d| {
                bar.inc(1);
                accuracy(model, set, d)
            })
            .collect()
    };
    let accuracy = [at_depths(&recurrent, &test), at_depths(&recurrent, &harder)];
    let baseline_accuracy = [at_depths(&baseline, &test), at_depths(&baseline, &harder)];
    let level_accuracy: Vec<(usize, Vec<f64>)> = by_chain
        .iter()
        .map(|(c, set)| (*c, at_depths(&recurrent, set)))
        .collect();
    bar.finish_and_clear();

    let bar = progress_bar(progress, (config.exits.len() * by_chain.len()) as u64, "adaptive exit");
    let mut exits = Vec::new();
    for &exit in &config.exits {
        let mut steps_by_level = BTreeMap::new();
        let mut all_steps = Vec::new();
        let (mut right, mut steps_sum, mut count) = (0usize, 0.0, 0usize);
        for (c, set) in &by_chain {
            let results = adaptive(&recurrent, set, exit, config.exit_max_steps)?;
            let mean = results.iter().map(|r| r.0).sum::<f64>() / results.len() as f64;
            steps_by_level.insert(*c, mean);
            all_steps.extend(results.iter().map(|r| r.0.round() as usize));
            right += results.iter().filter(|r| r.1).count();
            steps_sum += results.iter().map(|r| r.0).sum::<f64>();
            count += results.len();
            bar.inc(1);
        }
        let levels: Vec<f64> = steps_by_level.keys().map(|c| *c as f64).collect();
        let means: Vec<f64> = steps_by_level.values().copied().collect();
        exits.push(ExitResult {
            criterion: exit.0,
            threshold: exit.1,
            accuracy: right as f64 / count as f64,
            mean_steps: steps_sum / count as f64,
            steps_by_level,
            spearman: spearman(&levels, &means),
            all_steps,
        });
    }
    bar.finish_and_clear();

    let fixed32 = depths
        .iter()
        .position(|d| *d == 32)
        .map(|i| accuracy[0][i])
        .unwrap_or(f64::NAN);
    let exit_json = |e: &ExitResult| {
        json!({
            "criterion": e.criterion.name(),
            "threshold": e.threshold,
            "accuracy": e.accuracy,
            "fixed32_accuracy": fixed32,
            "mean_steps": e.mean_steps,
            "mean_steps_by_difficulty": e.steps_by_level.iter().map(|(c, m)| (c.to_string(), *m)).collect::<BTreeMap<_, _>>(),
            "spearman_steps_vs_difficulty": e.spearman,
        })
    };
    let mut report = json!({
        "task": "addition",
        "difficulty": "longest carry chain",
        "accuracy_by_depth": {
            "in_distribution": by_depth(depths, &accuracy[0]),
            "harder": by_depth(depths, &accuracy[1]),
        },
        "baseline_accuracy_by_depth": {
            "in_distribution": by_depth(depths, &baseline_accuracy[0]),
            "harder": by_depth(depths, &baseline_accuracy[1]),
        },
        "accuracy_by_carry_chain_and_depth": level_accuracy.iter().map(|(c, a)| (c.to_string(), by_depth(depths, a))).collect::<BTreeMap<_, _>>(),
        "examples_by_carry_chain": by_chain.iter().map(|(c, s)| (c.to_string(), s.len())).collect::<BTreeMap<_, _>>(),
        "adaptive_exit": exit_json(&exits[0]),
        "adaptive_exit_rules": exits.iter().map(exit_json).collect::<Vec<_>>(),
        "train_mean_depth": train_mean_depth,
        "config": {
            "steps": config.steps, "max_digits": config.max_digits, "width": config.width, "heads": config.heads,
            "layers": [config.layers.0, config.layers.1, config.layers.2],
            "mean_depth": config.mean_depth, "backprop": config.backprop,
            "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed, "eval_rows": config.eval_rows,
        },
    });
    let example = test.iter().max_by_key(|e| e.carry_chain).unwrap_or(&test[0]);
    let names = report::Figures {
        title: "Recurrent depth on reversed-digit addition",
        level: "carry chain",
        trained: format!("up to {} digits", config.max_digits),
        harder: format!("{}-{} digits", config.max_digits + 1, 2 * config.max_digits),
        prompt: example.tokens[..example.answer_start].to_vec(),
    };
    report::task_figures(
        &names,
        out,
        &recurrent,
        &level_accuracy,
        depths,
        &accuracy,
        &baseline_accuracy,
        &exits,
        progress,
        &mut report,
    )?;
    report["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    report::write_json(out, &report)?;
    print_summary(depths, &accuracy, &baseline_accuracy, &exits, fixed32);
    Ok(())
}
