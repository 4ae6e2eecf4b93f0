//! `--config FILE` with flags: each flag typed on the command line replaces what it stands for in
//! the file's configuration, and flags not typed leave the file alone.
//!
//! A flag that a run without a file turns into several values sets all of them the same way:
//! `--width` also sets the MLP width (11/4 of it), `--steps` the schedule's length, data flags
//! the model's vocabulary and context, depth flags the depth recorded in the model's config, and
//! `--seed` the task generator's seed. `--lr` keeps the file's ratio of final to peak rate. What
//! no flag expresses (betas, a hand-set MLP width) stays as the file has it; where the file lacks
//! a value a flag refines (switching a constant schedule to cosine), the flag's default fills it.

use anyhow::{Context, Result, bail};
use model::HuginnConfig;
use train::data::DataConfig;
use train::depth::DepthScheme;
use train::run::{OptimizerConfig, RunConfig};
use train::schedule::Schedule;

use crate::{Args, Optimizer, ScheduleKind, Scheme, depth_scheme, fit_to_data, fit_to_depth, optimizer, schedule};

/// The data flags of each task.
const HOP_TASKS: &[&str] = &["curriculum"];
const ADDITION: &[&str] = &["max_digits", "padded"];
const TEXT: &[&str] = &["text_files", "jsonl_field", "tokenizer", "vocab_size", "seq_len"];
const CHAT: &[&str] = &["data"];

/// Applies to `config` the flags of `args` for which `given(id)` (the flag's clap id) holds.
pub fn apply(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) -> Result<()> {
    run(config, args, given);
    data(config, args, given)?;
    model(&mut config.model, args, given)?;
    depth(config, args, given);
    optimizer_flags(config, args, given);
    schedule_flags(config, args, given);
    Ok(())
}

/// The flag's value if it was given, the file's otherwise.
fn pick<T>(given: bool, flag: T, file: T) -> T {
    if given { flag } else { file }
}

fn run(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) {
    if given("seed") {
        config.seed = args.seed;
        if let DataConfig::Chains { seed, .. } | DataConfig::Pointers { seed, .. } | DataConfig::Addition { seed, .. } =
            &mut config.data
        {
            *seed = args.seed;
        }
    }
    config.steps = pick(given("steps"), args.steps, config.steps);
    config.batch_size = pick(given("batch_size"), args.batch_size, config.batch_size);
    config.accumulation = pick(given("accumulation"), args.accumulation, config.accumulation);
    config.max_grad_norm = pick(given("max_grad_norm"), args.max_grad_norm(), config.max_grad_norm);
    config.eval_every = pick(given("eval_every"), args.eval_every, config.eval_every);
    config.eval_rows = pick(given("eval_rows"), args.eval_rows, config.eval_rows);
    if given("eval_depths") {
        config.eval_depths = args.eval_depths.clone();
    }
    config.checkpoint_every = pick(
        given("checkpoint_every"),
        args.checkpoint_every,
        config.checkpoint_every,
    );
    config.keep_checkpoints = pick(given("keep"), args.keep, config.keep_checkpoints);
    if given("devices") {
        config.devices = args.devices.clone();
    }
}

fn data(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) -> Result<()> {
    let flags = [HOP_TASKS, ADDITION, TEXT, CHAT].concat();
    if given("task") {
        let seed = match config.data {
            DataConfig::Chains { seed, .. } | DataConfig::Pointers { seed, .. } | DataConfig::Addition { seed, .. } => {
                seed
            }
            DataConfig::Text { .. } | DataConfig::Chat { .. } => config.seed,
        };
        config.data = args.data(seed);
    } else if flags.iter().any(|f| given(f)) {
        let (kind, own) = match &mut config.data {
            DataConfig::Chains { curriculum, .. } => {
                *curriculum = pick(given("curriculum"), args.curriculum, *curriculum);
                ("chains", HOP_TASKS)
            }
            DataConfig::Pointers { curriculum, .. } => {
                *curriculum = pick(given("curriculum"), args.curriculum, *curriculum);
                ("pointers", HOP_TASKS)
            }
            DataConfig::Addition { max_digits, padded, .. } => {
                *max_digits = pick(given("max_digits"), args.max_digits, *max_digits);
                *padded = pick(given("padded"), args.padded, *padded);
                ("addition", ADDITION)
            }
            DataConfig::Text {
                files,
                field,
                tokenizer,
                seq_len,
            } => {
                if given("text_files") {
                    *files = args.text_files.clone();
                }
                if given("jsonl_field") {
                    *field = args.jsonl_field.clone();
                }
                if given("tokenizer") || given("vocab_size") {
                    *tokenizer = args.tokenizer_source();
                }
                *seq_len = pick(given("seq_len"), args.seq_len, *seq_len);
                ("text", TEXT)
            }
            DataConfig::Chat { file, .. } => {
                if let (true, Some(data)) = (given("data"), &args.data) {
                    *file = data.clone();
                }
                ("chat", CHAT)
            }
        };
        if let Some(id) = flags.iter().find(|f| given(f) && !own.contains(f)) {
            let flag = match *id {
                "text_files" => "text-file".to_string(),
                id => id.replace('_', "-"),
            };
            bail!("--{flag} does not apply to the configuration's {kind} data (give --task to replace the data)");
        }
    } else {
        return Ok(());
    }
    fit_to_data(&mut config.model, &config.data)
}

fn model(model: &mut HuginnConfig, args: &Args, given: &dyn Fn(&str) -> bool) -> Result<()> {
    if !["width", "heads", "layers"].iter().any(|f| given(f)) {
        return Ok(());
    }
    if given("width") {
        model.n_embd = args.width;
        // The MLP width a run without a file gets for this width.
        model.intermediate_size = HuginnConfig::tiny(model.vocab_size, args.width, 1, args.layers).intermediate_size;
    }
    model.n_heads = pick(given("heads"), args.heads, model.n_heads);
    if given("layers") {
        let (prelude, core, coda) = args.layers;
        model.n_layers_in_prelude = prelude;
        model.n_layers_in_recurrent_block = core;
        model.n_layers_in_coda = coda;
        model.n_layers = prelude + core + coda;
    }
    model.validate().context("model shape")
}

fn depth(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) {
    if !["depth_scheme", "mean_depth", "backprop"].iter().any(|f| given(f)) {
        return;
    }
    let (scheme, mean, backprop) = match config.depth {
        DepthScheme::PoissonLognormalFilling { mean, backprop } => (Scheme::PoissonLognormalFilling, mean, backprop),
        DepthScheme::Fixed { steps, backprop } => (Scheme::Fixed, steps, backprop),
        DepthScheme::NonRecurrent => (Scheme::NonRecurrent, args.mean_depth, config.model.mean_backprop_depth),
    };
    let backprop = pick(given("backprop"), args.backprop, backprop);
    config.depth = depth_scheme(
        pick(given("depth_scheme"), args.depth_scheme, scheme),
        pick(given("mean_depth"), args.mean_depth, mean),
        backprop,
    );
    fit_to_depth(&mut config.model, &config.depth, backprop);
}

fn optimizer_flags(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) {
    let (kind, weight_decay) = match config.optimizer {
        OptimizerConfig::EllisAdam { weight_decay, .. } => (Optimizer::EllisAdam, weight_decay),
        OptimizerConfig::AdamW { weight_decay, .. } => (Optimizer::Adamw, weight_decay as f64),
    };
    if given("optimizer") && args.optimizer != kind {
        config.optimizer = optimizer(args.optimizer, weight_decay);
    }
    if given("weight_decay") {
        match &mut config.optimizer {
            OptimizerConfig::EllisAdam { weight_decay, .. } => *weight_decay = args.weight_decay,
            OptimizerConfig::AdamW { weight_decay, .. } => *weight_decay = args.weight_decay as f32,
        }
    }
}

fn schedule_flags(config: &mut RunConfig, args: &Args, given: &dyn Fn(&str) -> bool) {
    let flags = ["schedule", "lr", "warmup", "cooldown", "min_lr_fraction", "steps"];
    if !flags.iter().any(|f| given(f)) {
        return;
    }
    let (kind, peak, warmup, total, cooldown, min_lr) = match config.schedule {
        Schedule::Constant { peak_lr, warmup } => (
            ScheduleKind::Constant,
            peak_lr,
            warmup,
            config.steps,
            args.cooldown,
            peak_lr * args.min_lr_fraction,
        ),
        Schedule::Cosine {
            peak_lr,
            warmup,
            total_steps,
            min_lr,
        } => (
            ScheduleKind::Cosine,
            peak_lr,
            warmup,
            total_steps,
            args.cooldown,
            min_lr,
        ),
        Schedule::Trapezoid {
            peak_lr,
            warmup,
            total_steps,
            cooldown,
            min_lr,
        } => (ScheduleKind::Trapezoid, peak_lr, warmup, total_steps, cooldown, min_lr),
    };
    let peak_lr = pick(given("lr"), args.lr, peak);
    let min_lr = if given("min_lr_fraction") {
        peak_lr * args.min_lr_fraction
    } else if given("lr") {
        min_lr / peak * peak_lr
    } else {
        min_lr
    };
    config.schedule = schedule(
        pick(given("schedule"), args.schedule, kind),
        peak_lr,
        pick(given("warmup"), args.warmup, warmup),
        pick(given("steps"), args.steps, total),
        pick(given("cooldown"), args.cooldown, cooldown),
        min_lr,
    );
}

#[cfg(test)]
mod tests {
    use clap::parser::ValueSource;
    use clap::{ArgMatches, CommandFactory, FromArgMatches};

    use super::*;

    fn parse(flags: &[&str]) -> (Args, ArgMatches) {
        let matches = Args::command()
            .try_get_matches_from(std::iter::once("huginn-train").chain(flags.iter().copied()))
            .unwrap();
        (Args::from_arg_matches(&matches).unwrap(), matches)
    }

    /// `file` with `flags` typed on the command line.
    fn with_flags(file: &RunConfig, flags: &[&str]) -> Result<RunConfig> {
        let (args, matches) = parse(flags);
        let mut config = file.clone();
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        apply(&mut config, &args, &given)?;
        Ok(config)
    }

    /// A configuration unlike the defaults in every group.
    fn file() -> RunConfig {
        let (args, _) = parse(&[
            "--task",
            "addition",
            "--max-digits",
            "3",
            "--seed",
            "4",
            "--width",
            "32",
            "--heads",
            "2",
            "--layers",
            "2,3,1",
            "--depth-scheme",
            "fixed",
            "--mean-depth",
            "5",
            "--backprop",
            "2",
            "--optimizer",
            "adamw",
            "--weight-decay",
            "0.1",
            "--lr",
            "3e-3",
            "--min-lr-fraction",
            "0.5",
            "--steps",
            "40",
            "--eval-depths",
            "1,3",
            "--max-grad-norm",
            "0",
        ]);
        args.flags_config().unwrap()
    }

    #[test]
    fn flags_not_given_keep_the_files_values() {
        let file = file();
        assert_eq!(with_flags(&file, &["--out", "elsewhere", "--quiet"]).unwrap(), file);
    }

    #[test]
    fn every_flag_given_is_the_configuration_of_the_flags_alone() {
        let flags = [
            "--task",
            "chains",
            "--curriculum",
            "7",
            "--max-digits",
            "2",
            "--padded",
            "--text-file",
            "a.txt",
            "--jsonl-field",
            "body",
            "--tokenizer",
            "t.json",
            "--vocab-size",
            "500",
            "--seq-len",
            "32",
            "--width",
            "48",
            "--heads",
            "4",
            "--layers",
            "1,2,1",
            "--depth-scheme",
            "poisson-lognormal-filling",
            "--mean-depth",
            "6",
            "--backprop",
            "3",
            "--steps",
            "30",
            "--batch-size",
            "5",
            "--accumulation",
            "2",
            "--optimizer",
            "ellis-adam",
            "--lr",
            "2e-3",
            "--weight-decay",
            "0.05",
            "--schedule",
            "trapezoid",
            "--warmup",
            "3",
            "--cooldown",
            "4",
            "--min-lr-fraction",
            "0.2",
            "--max-grad-norm",
            "0.5",
            "--seed",
            "9",
            "--eval-every",
            "6",
            "--eval-rows",
            "12",
            "--eval-depths",
            "2,8",
            "--checkpoint-every",
            "10",
            "--keep",
            "1",
            "--devices",
            "cpu:0",
        ];
        let (args, _) = parse(&flags);
        assert_eq!(with_flags(&file(), &flags).unwrap(), args.flags_config().unwrap());
    }

    #[test]
    fn a_flag_sets_every_value_it_stands_for_and_only_those() {
        let file = file();
        let Schedule::Cosine { min_lr, .. } = file.schedule else {
            panic!("{:?}", file.schedule)
        };
        let c = with_flags(&file, &["--steps", "80", "--lr", "1e-3", "--width", "64"]).unwrap();
        assert_eq!(c.steps, 80);
        let expected = Schedule::Cosine {
            peak_lr: 1e-3,
            warmup: 100,
            total_steps: 80,
            min_lr: min_lr / 3e-3 * 1e-3,
        };
        assert_eq!(c.schedule, expected);
        assert_eq!(
            (c.model.n_embd, c.model.intermediate_size, c.model.n_heads),
            (64, 176, 2)
        );
        assert_eq!(c.optimizer, file.optimizer);

        let c = with_flags(&file, &["--mean-depth", "9"]).unwrap();
        assert_eq!(c.depth, DepthScheme::Fixed { steps: 9, backprop: 2 });
        assert_eq!(c.model.mean_recurrence, 9);

        let c = with_flags(&file, &["--max-digits", "4"]).unwrap();
        let expected = DataConfig::Addition {
            seed: 4,
            max_digits: 4,
            padded: false,
        };
        assert_eq!(c.data, expected);
        for (flag, value) in [("--seq-len", "64"), ("--text-file", "a.txt"), ("--curriculum", "3")] {
            let err = with_flags(&file, &[flag, value]).unwrap_err().to_string();
            let message = format!("{flag} does not apply to the configuration's addition data");
            assert!(err.starts_with(&message), "{err}");
        }
    }
}
