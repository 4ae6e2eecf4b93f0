//! `huginn-train`: train a recurrent-depth model from scratch on a generated reasoning task or
//! on text, on any compiled backend, with crash-safe checkpoints.
//!
//! ```text
//! huginn-train --config train/configs/pointers.toml --out runs/pointers   # the demo's recipe
//! huginn-train --task chains --out runs/chains --steps 2500
//! huginn-train --out runs/chains --resume          # after a crash or Ctrl-C
//! huginn-train --task text --text-file book.txt --vocab-size 4096 --seq-len 128 --out runs/lm
//! huginn-train --config train/configs/chains.toml --steps 500 --out runs/short   # a file, one flag changed
//! huginn-train --task text --width 128 --print-config > lm.toml                  # start a file
//! huginn-train --init-from tomg-group-umd/huginn-0125 --task chat --data qa.jsonl --out runs/ft
//! huginn-train --config train/configs/pointers.toml --devices wgpu:0,wgpu:1 --batch-size 16 --accumulation 2
//! ```

mod init;
mod overrides;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::prelude::Device;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use model::{Backend, DeviceSpec, HuginnConfig};
use train::chat_data::ChatFormat;
use train::data::{DataConfig, Dataset, TokenizerSource};
use train::depth::DepthScheme;
use train::layout::parse_layers;
use train::limits::{
    MAX_ACCUMULATION, MAX_BATCH, MAX_DIGITS, MAX_EVAL_DEPTH, MAX_EVAL_ROWS, MAX_HEADS, MAX_KEEP, MAX_MEAN_DEPTH,
    MAX_SEED, MAX_SEQ_LEN, MAX_STEPS, MAX_VOCAB, MAX_WIDTH, count, count64, non_negative,
};
use train::run::{OptimizerConfig, RunConfig, Trainer};
use train::schedule::Schedule;

#[derive(Parser, Debug)]
#[command(name = "huginn-train", version, about = "Train a recurrent-depth language model.")]
struct Args {
    /// Run directory (configuration, metrics, checkpoints, final model).
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue the run in --out from its newest checkpoint (its run.json decides everything).
    #[arg(long)]
    resume: bool,
    /// A run configuration in TOML (the form of a run's run.toml); flags given as well override
    /// its values, flags not given keep them.
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Print the run's configuration as TOML and exit, training nothing.
    #[arg(long, conflicts_with = "resume")]
    print_config: bool,
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Devices of one backend to train on together, e.g. `wgpu:0,wgpu:1` or `cuda:0,cuda:1`:
    /// each runs whole micro-batches (--accumulation must be a multiple of their number) and the
    /// numbers are those of one device. Kept in the run; given with --resume, replaces its list.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    devices: Vec<DeviceSpec>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Fine-tune: start from this model folder or hub name (ORG/NAME[@REVISION]), its shape
    /// and weights, with a fresh optimizer. The training depth defaults to the model's.
    #[arg(long, conflicts_with = "resume")]
    init_from: Option<PathBuf>,

    // Data.
    #[arg(long, value_enum, default_value_t = Task::Chains)]
    task: Task,
    /// Text or JSONL files (`--task text`); none: the embedded Shakespeare slice.
    #[arg(long = "text-file")]
    text_files: Vec<PathBuf>,
    /// The JSONL field holding a document's text.
    #[arg(long, default_value = "text")]
    jsonl_field: String,
    /// Chat records, JSONL (`--task chat`): a list of messages per record, or a question and
    /// an answer (--question-field, --answer-field).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The field of a chat record holding its messages (`role`, `content`).
    #[arg(long, default_value = "messages")]
    messages_field: String,
    /// Chat records as question/answer pairs: the question's field.
    #[arg(long, requires = "answer_field")]
    question_field: Option<String>,
    /// The answer's field.
    #[arg(long, requires = "question_field")]
    answer_field: Option<String>,
    /// A tokenizer.json to use instead of training a byte-level BPE.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary of the BPE trained on the corpus.
    #[arg(long, default_value_t = 2048, value_parser = count::<1, MAX_VOCAB>)]
    vocab_size: usize,
    /// Tokens per text row.
    #[arg(long, default_value_t = 128, value_parser = count::<1, MAX_SEQ_LEN>)]
    seq_len: usize,
    /// Chains and pointers: batches over which the most hops ramps from 1 to the task's most (10 for pointers, 6 for chains; 0: none).
    #[arg(long, default_value_t = 0, value_parser = count64::<0, MAX_STEPS>)]
    curriculum: u64,
    /// Most digits of a training operand (`--task addition`).
    #[arg(long, default_value_t = 5, value_parser = count::<1, MAX_DIGITS>)]
    max_digits: usize,
    /// Pad addition operands to a fixed width.
    #[arg(long)]
    padded: bool,

    // Model.
    #[arg(long, default_value_t = 64, value_parser = count::<1, MAX_WIDTH>)]
    width: usize,
    #[arg(long, default_value_t = 4, value_parser = count::<1, MAX_HEADS>)]
    heads: usize,
    /// Prelude, core and coda layers.
    #[arg(long, default_value = "1,2,1", value_parser = parse_layers)]
    layers: (usize, usize, usize),

    // Depth.
    #[arg(long, value_enum, default_value_t = Scheme::PoissonLognormalFilling)]
    depth_scheme: Scheme,
    /// Mean recurrence r̄ (the fixed depth for `--depth-scheme fixed`).
    #[arg(long, default_value_t = 6, value_parser = count::<1, MAX_MEAN_DEPTH>)]
    mean_depth: usize,
    /// Recurrence steps with gradient (truncated backprop), k.
    #[arg(long, default_value_t = 3, value_parser = count::<1, MAX_MEAN_DEPTH>)]
    backprop: usize,

    // Optimisation.
    #[arg(long, default_value_t = 2000, value_parser = count64::<1, MAX_STEPS>)]
    steps: u64,
    #[arg(long, default_value_t = 32, value_parser = count::<1, MAX_BATCH>)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = count::<1, MAX_ACCUMULATION>)]
    accumulation: usize,
    #[arg(long, value_enum, default_value_t = Optimizer::EllisAdam)]
    optimizer: Optimizer,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    weight_decay: f64,
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    schedule: ScheduleKind,
    #[arg(long, default_value_t = 100, value_parser = count64::<0, MAX_STEPS>)]
    warmup: u64,
    /// Cooldown steps of the trapezoid schedule.
    #[arg(long, default_value_t = 0, value_parser = count64::<0, MAX_STEPS>)]
    cooldown: u64,
    /// Final learning rate as a fraction of --lr (cosine, trapezoid).
    #[arg(long, default_value_t = 0.1)]
    min_lr_fraction: f64,
    /// Global gradient-norm bound; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0, value_parser = non_negative)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0, value_parser = count64::<0, MAX_SEED>)]
    seed: u64,

    // Evaluation and checkpoints.
    #[arg(long, default_value_t = 250, value_parser = count64::<1, MAX_STEPS>)]
    eval_every: u64,
    #[arg(long, default_value_t = 256, value_parser = count::<1, MAX_EVAL_ROWS>)]
    eval_rows: usize,
    /// Evaluation depths (default: powers of two up to 4·r̄).
    #[arg(long, value_delimiter = ',', value_parser = count::<1, MAX_EVAL_DEPTH>)]
    eval_depths: Vec<usize>,
    #[arg(long, default_value_t = 250, value_parser = count64::<1, MAX_STEPS>)]
    checkpoint_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3, value_parser = count::<1, MAX_KEEP>)]
    keep: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Task {
    Chains,
    Pointers,
    Addition,
    Text,
    /// Chat records through the --init-from model's chat template; loss on the assistant's tokens.
    Chat,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Scheme {
    PoissonLognormalFilling,
    Fixed,
    NonRecurrent,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Optimizer {
    EllisAdam,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum ScheduleKind {
    Constant,
    Cosine,
    Trapezoid,
}

impl Args {
    /// The run's configuration: the file's with the flags typed on the command line applied on
    /// top, or, without a file, the flags' (given or default).
    fn run_config(&self, matches: &ArgMatches) -> Result<RunConfig> {
        self.check_flags()?;
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let mut config = match &self.config {
            Some(path) => {
                let mut config = RunConfig::from_toml_file(path)?;
                overrides::apply(&mut config, self, &given)?;
                config
            }
            None => self.flags_config()?,
        };
        init::apply(&mut config, self, &given)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the flags' parsers do not (their ranges), so an error names the flag.
    fn check_flags(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, not {}", self.lr);
        }
        if !(0.0..=1.0).contains(&self.min_lr_fraction) {
            bail!("--min-lr-fraction must lie in [0, 1]");
        }
        if self.task == Task::Chat && (self.data.is_none() || self.init_from.is_none()) {
            bail!("--task chat needs --data FILE.jsonl and --init-from MODEL (whose chat template it uses)");
        }
        Ok(())
    }

    /// The configuration of the flags alone (no file).
    fn flags_config(&self) -> Result<RunConfig> {
        let data = self.data(self.seed);
        let depth = depth_scheme(self.depth_scheme, self.mean_depth, self.backprop);
        let mut model = HuginnConfig::tiny(0, self.width, self.heads, self.layers);
        fit_to_data(&mut model, &data)?;
        fit_to_depth(&mut model, &depth, self.backprop);
        model.validate().context("model shape")?;
        let eval_depths = if self.eval_depths.is_empty() {
            RunConfig::default_eval_depths(&depth)
        } else {
            self.eval_depths.clone()
        };
        Ok(RunConfig {
            model,
            data,
            seed: self.seed,
            steps: self.steps,
            batch_size: self.batch_size,
            accumulation: self.accumulation,
            depth,
            optimizer: optimizer(self.optimizer, self.weight_decay),
            schedule: schedule(
                self.schedule,
                self.lr,
                self.warmup,
                self.steps,
                self.cooldown,
                self.lr * self.min_lr_fraction,
            ),
            max_grad_norm: self.max_grad_norm(),
            eval_every: self.eval_every,
            eval_rows: self.eval_rows,
            eval_depths,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep,
            init_from: None,
            devices: self.devices.clone(),
        })
    }

    /// The data the flags describe, the generated tasks seeded with `seed`.
    fn data(&self, seed: u64) -> DataConfig {
        match self.task {
            Task::Chains => DataConfig::Chains {
                seed,
                curriculum: self.curriculum,
            },
            Task::Pointers => DataConfig::Pointers {
                seed,
                curriculum: self.curriculum,
            },
            Task::Addition => DataConfig::Addition {
                seed,
                max_digits: self.max_digits,
                padded: self.padded,
            },
            Task::Text => DataConfig::Text {
                files: self.text_files.clone(),
                field: self.jsonl_field.clone(),
                tokenizer: self.tokenizer_source(),
                seq_len: self.seq_len,
            },
            Task::Chat => DataConfig::Chat {
                file: self.data.clone().unwrap_or_default(),
                format: match (&self.question_field, &self.answer_field) {
                    (Some(question), Some(answer)) => ChatFormat::Pair {
                        question: question.clone(),
                        answer: answer.clone(),
                    },
                    _ => ChatFormat::Messages {
                        field: self.messages_field.clone(),
                    },
                },
                folder: self.init_from.clone().unwrap_or_default(),
            },
        }
    }

    fn tokenizer_source(&self) -> TokenizerSource {
        match &self.tokenizer {
            Some(path) => TokenizerSource::File { path: path.clone() },
            None => TokenizerSource::Train {
                vocab_size: self.vocab_size,
            },
        }
    }

    /// The autodiff devices to train on: `--devices`, else `--device` when typed, else the
    /// run's own list (`stored`), else `--device`'s default.
    fn devices_for(&self, stored: &[DeviceSpec], matches: &ArgMatches) -> Result<Vec<Device>> {
        let typed = matches.value_source("device") == Some(ValueSource::CommandLine);
        let specs = match (self.devices.is_empty(), typed || stored.is_empty()) {
            (false, _) => self.devices.clone(),
            (true, true) => vec![DeviceSpec {
                backend: self.device,
                index: 0,
            }],
            (true, false) => stored.to_vec(),
        };
        let devices = DeviceSpec::devices(&specs)?;
        // One device trains on this thread; several have a thread each, which this one waits on.
        if devices.len() == 1 {
            model::kernels::threads::join_the_pool();
            model::kernels::heap::keep_freed_memory();
        }
        if specs.len() > 1 {
            let names: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
            eprintln!("training on {} devices: {}", specs.len(), names.join(", "));
        }
        Ok(devices.into_iter().map(Device::autodiff).collect())
    }

    fn max_grad_norm(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }
}

/// Sizes the model's vocabulary and context to what `data` needs; building the data here also
/// checks its files.
fn fit_to_data(model: &mut HuginnConfig, data: &DataConfig) -> Result<()> {
    let dataset = Dataset::new(data, None).context("reading the training data")?;
    model.vocab_size = dataset.vocab_size();
    model.block_size = dataset.context();
    Ok(())
}

/// Records the training depth in the model's config (its default depth at inference, and its
/// initialisation through the unrolled depth).
fn fit_to_depth(model: &mut HuginnConfig, depth: &DepthScheme, backprop: usize) {
    model.mean_recurrence = depth.mean_depth().round() as usize;
    model.mean_backprop_depth = backprop;
}

fn depth_scheme(scheme: Scheme, mean: usize, backprop: usize) -> DepthScheme {
    match scheme {
        Scheme::PoissonLognormalFilling => DepthScheme::PoissonLognormalFilling { mean, backprop },
        Scheme::Fixed => DepthScheme::Fixed { steps: mean, backprop },
        Scheme::NonRecurrent => DepthScheme::NonRecurrent,
    }
}

fn optimizer(kind: Optimizer, weight_decay: f64) -> OptimizerConfig {
    match kind {
        Optimizer::EllisAdam => OptimizerConfig::EllisAdam {
            beta_1: 0.9,
            beta_2: 0.95,
            weight_decay,
            update_clipping: true,
        },
        Optimizer::Adamw => OptimizerConfig::AdamW {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: weight_decay as f32,
        },
    }
}

fn schedule(kind: ScheduleKind, peak_lr: f64, warmup: u64, total_steps: u64, cooldown: u64, min_lr: f64) -> Schedule {
    match kind {
        ScheduleKind::Constant => Schedule::Constant { peak_lr, warmup },
        ScheduleKind::Cosine => Schedule::Cosine {
            peak_lr,
            warmup,
            total_steps,
            min_lr,
        },
        ScheduleKind::Trapezoid => Schedule::Trapezoid {
            peak_lr,
            warmup,
            total_steps,
            cooldown,
            min_lr,
        },
    }
}

fn run(args: Args, matches: &ArgMatches) -> Result<()> {
    if args.print_config {
        print!("{}", args.run_config(matches)?.to_toml().map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    let mut trainer = if args.resume {
        let devices = args.devices_for(&Trainer::stored_config(&args.out)?.devices, matches)?;
        let t = Trainer::resume_on(&args.out, &devices)?;
        for s in t.skipped() {
            eprintln!(
                "skipped a checkpoint that does not load: {}; moved it to {}",
                s.reason,
                s.moved_to.display()
            );
        }
        if t.resumed_unverified() {
            eprintln!(
                "note: this run's checkpoints predate checksums (checksums.json): the one resumed from \
                 is loaded unverified; checkpoints written from now on carry them"
            );
        }
        match t.resumed_from() {
            Some(checkpoint) => eprintln!(
                "resuming {} at step {} from {}",
                args.out.display(),
                t.state().step,
                checkpoint.display()
            ),
            None => eprintln!("resuming {} from the start (no checkpoint yet)", args.out.display()),
        }
        t
    } else {
        let config = args.run_config(matches)?;
        let devices = args.devices_for(&config.devices, matches)?;
        Trainer::create_on(&args.out, config, &devices)?
    };
    trainer.run(None, !args.quiet)?;
    let state = trainer.state();
    eprintln!(
        "done: {} steps, {} tokens, {:.1} s; model in {}",
        state.step,
        state.tokens,
        state.elapsed_seconds,
        args.out.join("final").display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let parsed = Args::command()
        .try_get_matches()
        .and_then(|matches| Args::from_arg_matches(&matches).map(|args| (args, matches)));
    let (args, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's first line says what is wrong; the rest is a pointer to --help.
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    match run(args, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
