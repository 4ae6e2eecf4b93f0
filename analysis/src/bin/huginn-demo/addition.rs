//! The addition demo: randomized-depth training on reversed-digit addition of operands up to 4
//! digits, written unpadded (so the model must find the digits to add by their place relative
//! to `+` and `=`, which is where depth helps), against the non-recurrent baseline; accuracy
//! against test-time depth, by longest carry chain, and zero-shot adaptive exit on every
//! answer digit.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use infer::adaptive::generate_batch;
use infer::exit::Criterion;
use model::Huginn;
use model::burn::prelude::*;
use serde_json::json;
use train::addition::{self, AdditionTask, Example, Split};
use train::data::DataConfig;

use crate::common::{
    Accuracies, ExitResult, Probe, Recipe, accuracy_by_depth, at_depth, exit_config, print_summary, progress_bar,
    spearman, task_report, train_both,
};
use crate::report;

#[derive(Debug, Clone)]
pub struct AdditionDemo {
    pub recipe: Recipe,
    /// Most digits of a training operand; the harder split has up to twice as many.
    pub max_digits: usize,
    /// Operands and sum padded to a fixed width (aligned digits) or written as they are.
    pub padded: bool,
    pub probe: Probe,
}

impl AdditionDemo {
    pub fn full() -> Self {
        Self {
            recipe: Recipe {
                seed: 0,
                steps: 1500,
                width: 64,
                heads: 4,
                layers: (1, 2, 1),
                // A deep mean: the model learns to rely on iterating, so one pass is not
                // enough (r̄ = 6 leaves it at 81% with one iteration, 12 at 20%).
                mean_depth: 12,
                backprop: 3,
                batch_size: 32,
                lr: 2e-3,
                eval_rows: 512,
            },
            max_digits: 4,
            padded: false,
            probe: Probe::standard(),
        }
    }

    pub fn quick() -> Self {
        let full = Self::full();
        Self {
            recipe: full.recipe.quick(),
            probe: full.probe.quick(),
            max_digits: full.max_digits,
            padded: full.padded,
        }
    }

    fn task(&self) -> AdditionTask {
        AdditionTask {
            seed: self.recipe.seed,
            max_digits: self.max_digits,
            padded: self.padded,
        }
    }
}

/// Greedy answers under an exit rule: each answer digit (and the newline) exits on its own.
/// Returns, per example, the mean steps over its answer tokens and whether all were right.
fn adaptive(
    model: &Huginn,
    examples: &[Example],
    exit: (Criterion, f64),
    max_steps: usize,
) -> Result<Vec<(f64, bool)>> {
    let config = exit_config(exit, max_steps);
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(128) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.tokens[..e.answer_start].to_vec()).collect();
        // Unpadded answers differ in length: generate the longest, score each on its own.
        let longest = chunk.iter().map(|e| e.tokens.len() - e.answer_start).max().unwrap_or(0);
        let rows = generate_batch(model, &prompts, longest, config).context("adaptive exit")?;
        for (row, e) in rows.iter().zip(chunk) {
            let answer = &e.tokens[e.answer_start..];
            let steps = row.steps_per_token[..answer.len()].iter().sum::<usize>() as f64 / answer.len() as f64;
            out.push((steps, row.tokens[..answer.len()] == *answer));
        }
    }
    Ok(out)
}

/// In-distribution test questions grouped by their longest carry chain (the difficulty), up
/// to `per_level` for each length 0..=max_digits: the long chains are rare (about 1 in 300
/// questions has a chain of 4), so a plain sample would leave them a handful of questions.
fn by_carry_chain(task: &AdditionTask, per_level: usize) -> BTreeMap<usize, Vec<Example>> {
    let mut levels: BTreeMap<usize, Vec<Example>> = (0..=task.max_digits).map(|c| (c, Vec::new())).collect();
    for i in 0..1_000_000 {
        if levels.values().all(|set| set.len() >= per_level) {
            break;
        }
        let e = task.example(Split::Test, i);
        let set = levels.entry(e.carry_chain).or_default();
        if set.len() < per_level {
            set.push(e);
        }
    }
    levels.retain(|_, set| !set.is_empty());
    levels
}

pub fn run(config: &AdditionDemo, out: &Path, device: &Device, progress: bool, started: Instant) -> Result<()> {
    let recipe = &config.recipe;
    let task = config.task();
    let data = DataConfig::Addition {
        seed: task.seed,
        max_digits: task.max_digits,
        padded: task.padded,
    };
    let context = task.max_len(Split::Harder);
    let trained = train_both(recipe, (addition::VOCAB_SIZE, context, data), out, device, progress)?;
    let (recurrent, baseline) = (&trained.recurrent, &trained.baseline);

    let rows = recipe.eval_rows as u64;
    let test: Vec<_> = (0..rows).map(|i| task.example(Split::Test, i)).collect();
    let harder: Vec<_> = (0..rows).map(|i| task.example(Split::Harder, i)).collect();
    let by_chain = by_carry_chain(&task, recipe.eval_rows / (config.max_digits + 1));

    let depths = &config.probe.depths;
    let bar = progress_bar(
        progress,
        (depths.len() * (4 + by_chain.len())) as u64,
        "evaluating at each depth",
    );
    let at_depths = |model: &Huginn, set: &[Example]| accuracy_by_depth(model, set, addition::PAD, depths, &bar);
    let accuracy = [at_depths(recurrent, &test), at_depths(recurrent, &harder)];
    let baseline_accuracy = [at_depths(baseline, &test), at_depths(baseline, &harder)];
    let level_accuracy: Vec<(usize, Vec<f64>)> = by_chain
        .iter()
        .map(|(c, set)| (*c, at_depths(recurrent, set)))
        .collect();
    bar.finish_and_clear();

    let bar = progress_bar(
        progress,
        (config.probe.exits.len() * by_chain.len()) as u64,
        "adaptive exit",
    );
    // Adaptive exit is scored on the difficulty sets, so fixed depth 32 is too.
    let fixed32 = level_accuracy
        .iter()
        .zip(by_chain.values())
        .map(|((_, a), set)| at_depth(depths, a, 32) * set.len() as f64)
        .sum::<f64>()
        / by_chain.values().map(Vec::len).sum::<usize>() as f64;
    let mut exits = Vec::new();
    for &exit in &config.probe.exits {
        let mut steps_by_level = BTreeMap::new();
        let mut all_steps = Vec::new();
        let (mut right, mut steps_sum, mut count) = (0usize, 0.0, 0usize);
        for (c, set) in &by_chain {
            let results = adaptive(recurrent, set, exit, config.probe.exit_max_steps)?;
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
            fixed32_accuracy: fixed32,
            mean_steps: steps_sum / count as f64,
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
        by_level: level_accuracy,
        questions: [test.len(), harder.len()],
    };
    let mut report = task_report(
        "addition",
        "longest carry chain",
        &accuracies,
        &exits,
        &trained,
        recipe,
        json!({
            "max_digits": config.max_digits,
            "examples_by_carry_chain": by_chain.iter().map(|(c, s)| (c.to_string(), s.len())).collect::<BTreeMap<_, _>>(),
        }),
    );
    let example = test.iter().max_by_key(|e| e.carry_chain).unwrap_or(&test[0]);
    let names = report::Figures {
        title: "Recurrent depth on reversed-digit addition",
        level: "carry chain",
        trained: format!("up to {} digits", config.max_digits),
        harder: format!("{}-{} digits", config.max_digits + 1, 2 * config.max_digits),
        prompt: example.tokens[..example.answer_start].to_vec(),
    };
    report::task_figures(&names, out, recurrent, &accuracies, &exits, progress, &mut report)?;
    report["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    report::write_json(out, &report)?;
    print_summary(&accuracies, &exits);
    Ok(())
}
