//! `huginn-analysis`: latent dynamics of recurrent-depth models from the command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use analysis::capture::{Capture, CaptureOptions, Init};
use analysis::curves::{Metric, TrainingCurves};
use analysis::dynamics::{self, Motif, classify};
use analysis::pca::{Pca, PcaOptions};
use analysis::plot::compute::plot_accuracy_against_compute;
use analysis::plot::depth::{Colours, plot_depth_curves};
use analysis::plot::heatmap::plot_convergence;
use analysis::plot::training::plot_training_curves;
use analysis::plot::trajectories::{TokenTrajectory, component_pairs, plot_trajectories};
use analysis::prompt::Prompt;
use analysis::report::{PromptInput, ReportOptions, project_capture, select_tokens, write_report};
use analysis::with_suffix;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use model::burn::prelude::Tensor;
use model::{Backend, Huginn};

#[derive(Parser)]
#[command(
    name = "huginn-analysis",
    version,
    about = "Latent dynamics of recurrent-depth models: captures, PCA, trajectory plots, reports"
)]
struct Cli {
    /// Compute backend: cpu, wgpu or cuda (those compiled into this binary).
    #[arg(long, global = true, default_value = "cpu")]
    device: Backend,
    /// Round a float folder's linear weights to 8 or 4 bits as it loads (a folder written by
    /// `huginn quantize` loads as it is stored).
    #[arg(long, global = true)]
    quantize: Option<model::Bits>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a prompt for R iterations and store every normalised state and read-out
    /// (<OUT>.safetensors + <OUT>.json).
    Capture {
        /// Model folder: a training run's final/, any Hugging Face folder, a Burn record (model.bpk),
        /// or ORG/NAME[@REVISION] on the hub.
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        prompt: PromptArgs,
        /// tokenizer.json for --text and token labels (default: the model folder's, or its parent's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// R: recurrence steps to record (1-1024).
        #[arg(long, default_value_t = 64, value_parser = steps_parser(), allow_hyphen_values = true)]
        steps: usize,
        /// Also run on to this many steps and keep that state as s* (for the heat map; 1-4096).
        #[arg(long, value_parser = reference_steps_parser())]
        reference_steps: Option<usize>,
        #[command(flatten)]
        init: InitArgs,
        /// Keep the raw states s_i too.
        #[arg(long)]
        raw: bool,
        /// Output base path.
        #[arg(long)]
        out: PathBuf,
    },
    /// How far 8- and 4-bit weights (or, with --dtype, a half-precision float type) move the
    /// predictions at each recurrence depth: the KL divergence of next-token distributions
    /// between the float model and its copies, their top-1 agreement, and each one's perplexity
    /// on the tokens.
    QuantizationError {
        /// Float model folder, or ORG/NAME[@REVISION] on the hub.
        #[arg(long)]
        model: PathBuf,
        /// A text file to score, through the folder's tokenizer.
        #[arg(long, conflicts_with = "ids")]
        text: Option<PathBuf>,
        /// Token ids to score, comma separated.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u32>,
        /// Recurrence depths (each 1-1024).
        #[arg(long, value_delimiter = ',', default_value = "4,8,16,32")]
        depths: Vec<usize>,
        /// Bit widths to compare with the float model.
        #[arg(long, value_delimiter = ',', default_value = "8,4")]
        bits: Vec<model::Bits>,
        /// Instead of quantized weights: the model in this float type (f16 or bf16) on --device
        /// against f32 on the CPU (f16 is how it runs on GPUs whose wgpu adapter has no bf16).
        #[arg(long, conflicts_with = "bits")]
        dtype: Option<model::Precision>,
        /// Tokens per window (2 to the model's context; default: the context).
        #[arg(long)]
        window: Option<usize>,
        /// Most tokens scored (2 to 1048576).
        #[arg(long, default_value_t = 4096)]
        max_tokens: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The largest magnitude each activation of a forward pass reaches (the embedding, every
    /// block's projections, MLP and residual sums, the adapter, the logits), against f16's
    /// largest value (65504): whether a model can run in f16.
    ActivationRanges {
        /// Model folder, or ORG/NAME[@REVISION] on the hub.
        #[arg(long, required_unless_present = "huginn_0125", conflicts_with = "huginn_0125")]
        model: Option<PathBuf>,
        /// Instead of a folder: random weights in Huginn-0125's shape, drawn as the reference
        /// initialises them (seeded by --seed).
        #[arg(long)]
        huginn_0125: bool,
        /// Float type of the weights and the pass: f32 or bf16 (both have f32's range, so values
        /// beyond f16's show).
        #[arg(long, default_value = "f32")]
        dtype: model::Precision,
        /// Prompt token ids, comma separated (default: --tokens random ids).
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u32>,
        /// Random prompt tokens when no --ids are given (1-4096).
        #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
        tokens: usize,
        /// Recurrence steps (1-1024).
        #[arg(long, default_value_t = 32, value_parser = steps_parser())]
        steps: usize,
        /// Seed of the random weights and tokens.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fit a PCA basis to the states of one or more captures (shared axes for all of them).
    Pca {
        /// Captures (base paths or their .safetensors/.json files).
        #[arg(required = true)]
        captures: Vec<PathBuf>,
        /// Principal components to fit (1-64).
        #[arg(long, default_value_t = 6, value_parser = count_parser())]
        components: usize,
        /// Fit on this many states drawn at random instead of all (at least 2).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1 << 32))]
        subsample: Option<usize>,
        /// Power iterations of the randomized fit (0-64).
        #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=64))]
        power_iterations: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw per-token trajectories in PCA space, with each token's dynamics motif.
    PlotTrajectories {
        capture: PathBuf,
        /// A basis from `pca` (default: fit one to this capture).
        #[arg(long)]
        basis: Option<PathBuf>,
        /// Positions to draw (default: a spread of up to --shown, one of each motif first).
        #[arg(long, value_delimiter = ',')]
        tokens: Vec<usize>,
        /// Tokens drawn (1-64).
        #[arg(long, default_value_t = 6, value_parser = count_parser())]
        shown: usize,
        /// Principal components to fit (1-64).
        #[arg(long, default_value_t = 6, value_parser = count_parser())]
        components: usize,
        /// Output base path (writes .png and .svg).
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw the convergence heat map of a capture (distance to s*, or to the last iterate).
    Heatmap {
        capture: PathBuf,
        /// Output base path (writes .png and .svg).
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw training curves (and final metric against depth) from a run's metrics.jsonl.
    TrainingCurves {
        /// A run directory or a metrics.jsonl file.
        metrics: PathBuf,
        /// Output base path: <OUT>.png|svg, and <OUT>-depth.png|svg when there are evaluations.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw a `huginn eval` report: accuracy against depth per task, and accuracy against mean
    /// steps per token with each exit criterion as a point beside the fixed-depth curve.
    EvalPlots {
        /// The report.json `huginn eval` wrote.
        report: PathBuf,
        /// Output base path: <OUT>-depth.png|svg and <OUT>-compute.png|svg.
        #[arg(long)]
        out: PathBuf,
    },
    /// Every figure for a training run, with index.html and report.json.
    Report {
        run: PathBuf,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Recurrence steps to record (1-1024).
        #[arg(long, default_value_t = 64, value_parser = steps_parser())]
        steps: usize,
        /// Steps of the reference state s* (1-4096).
        #[arg(long, default_value_t = 256, value_parser = reference_steps_parser())]
        reference_steps: usize,
        #[command(flatten)]
        init: InitArgs,
        /// Principal components to fit (1-64).
        #[arg(long, default_value_t = 6, value_parser = count_parser())]
        components: usize,
        /// Tokens drawn in the trajectory figure (1-64).
        #[arg(long, default_value_t = 6, value_parser = count_parser())]
        shown: usize,
        /// Output folder (default: RUN/report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct PromptArgs {
    /// Prompt text (needs a tokenizer).
    #[arg(long, conflicts_with = "ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<u32>,
}

impl PromptArgs {
    fn input(&self) -> PromptInput {
        match (&self.prompt, self.ids.is_empty()) {
            (Some(text), _) => PromptInput::Text(text.clone()),
            (None, false) => PromptInput::Ids(self.ids.clone()),
            (None, true) => PromptInput::Default,
        }
    }
}

#[derive(Args)]
struct InitArgs {
    /// Seed of the random initial state (the reference's like-init).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Scale of the random initial state (0-100).
    #[arg(long, default_value_t = 1.0, value_parser = init_scale, allow_hyphen_values = true)]
    init_scale: f64,
    /// Start from zeros instead.
    #[arg(long)]
    zeros: bool,
}

impl InitArgs {
    fn init(&self) -> Init {
        if self.zeros {
            Init::Zeros
        } else {
            Init::Random {
                seed: self.seed,
                scale: self.init_scale,
            }
        }
    }
}

/// Recurrence steps recorded: the engine's most (`huginn generate --steps`).
fn steps_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024)
}

/// Steps of the reference state s*, run on past the recorded ones.
fn reference_steps_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096)
}

/// Principal components and tokens drawn: more than a figure can show is a mistake.
fn count_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64)
}

/// `--init-scale`: finite, in 0..=100 (the bound the samplers use).
fn init_scale(text: &str) -> Result<f64, String> {
    let scale: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=infer::diffusion::MAX_INIT_SCALE).contains(&scale) {
        return Err(format!("must be in 0..={}", infer::diffusion::MAX_INIT_SCALE));
    }
    Ok(scale)
}

/// The bytes a capture of `steps` (and `reference_steps`) over `tokens` positions holds: one
/// f32 state per step and position, twice with the raw states kept.
fn capture_bytes(
    steps: usize,
    reference_steps: Option<usize>,
    raw: bool,
    tokens: usize,
    width: usize,
) -> Option<usize> {
    let states = steps.checked_add(1)?.checked_add(reference_steps.map_or(0, |_| 1))?;
    let copies = if raw { 2 } else { 1 };
    states.checked_mul(tokens)?.checked_mul(width)?.checked_mul(4 * copies)
}

fn main() -> ExitCode {
    // Clap's errors on one line, as every other binary of the workspace gives them.
    let cli = match infer::cli::parse::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = cli.device.device()?;
    match cli.command {
        Command::Capture {
            model,
            prompt,
            tokenizer,
            steps,
            reference_steps,
            init,
            raw,
            out,
        } => {
            let model = folder::hub::resolve(&model)?;
            let tokenizer = tokenizer.or_else(|| find_tokenizer(&model));
            let prompt = match (prompt.input(), &tokenizer) {
                (PromptInput::Text(text), Some(path)) => Prompt::from_text(&text, path)?,
                (PromptInput::Text(_), None) => bail!("--prompt needs a tokenizer: pass --tokenizer or use --ids"),
                (PromptInput::Ids(ids), tokenizer) => {
                    let mut prompt = Prompt::from_ids(ids);
                    if let Some(path) = tokenizer {
                        prompt.decode_with(path)?;
                    }
                    prompt
                }
                (PromptInput::Default, _) => bail!("give a prompt: --prompt TEXT or --ids 1,2,3"),
            };
            let huginn = Huginn::from_pretrained_quantized(&model, &device, cli.quantize)?;
            let needed = capture_bytes(steps, reference_steps, raw, prompt.len(), huginn.config().n_embd);
            infer::limits::check_machine_memory("this capture's states", needed)?;
            let options = CaptureOptions {
                steps,
                init: init.init(),
                raw,
                reference_steps,
            };
            let bar = progress();
            let capture = Capture::run(&huginn, &model.display().to_string(), prompt, &options, &bar)?;
            bar.finish_and_clear();
            capture.save(&out)?;
            eprintln!(
                "wrote {} and {}",
                with_suffix(&out, ".safetensors").display(),
                with_suffix(&out, ".json").display()
            );
        }
        Command::Pca {
            captures,
            components,
            subsample,
            power_iterations,
            seed,
            out,
        } => {
            let mut states = Vec::new();
            for path in &captures {
                let capture = Capture::load(path)?;
                if let Some(first) = states.first().map(|t: &Tensor<2>| t.dims()[1])
                    && first != capture.width()
                {
                    bail!(
                        "{}: width {} differs from the first capture's {first}",
                        path.display(),
                        capture.width()
                    );
                }
                states.push(capture.latents_tensor(&device));
            }
            let options = PcaOptions {
                components,
                power_iterations,
                seed,
                subsample,
                ..PcaOptions::default()
            };
            let pca = Pca::fit(Tensor::cat(states, 0), &options)?;
            pca.save(&out)?;
            let ratios: Vec<String> = pca
                .explained_ratio()
                .iter()
                .map(|r| format!("{:.1}%", 100.0 * r))
                .collect();
            eprintln!("wrote {} (explained: {})", out.display(), ratios.join(", "));
        }
        Command::PlotTrajectories {
            capture,
            basis,
            tokens,
            shown,
            components,
            out,
        } => {
            let capture = Capture::load(&capture)?;
            let pca = match basis {
                Some(path) => Pca::load(&path)?,
                None => {
                    let rows = capture.iterations() * capture.positions();
                    let options = PcaOptions {
                        components: components.min(capture.width()).min(rows.saturating_sub(1)),
                        ..PcaOptions::default()
                    };
                    Pca::fit(capture.latents_tensor(&device), &options)?
                }
            };
            let trajectories = project_capture(&pca, &capture, &device)?;
            let motifs: Vec<_> = trajectories.iter().map(|p| classify(p)).collect();
            if let Some(bad) = tokens.iter().find(|t| **t >= capture.positions()) {
                bail!("position {bad} is past the prompt's {} tokens", capture.positions());
            }
            let shown = if tokens.is_empty() {
                select_tokens(&motifs, shown)
            } else {
                tokens
            };
            let drawn: Vec<TokenTrajectory> = shown
                .iter()
                .map(|&t| TokenTrajectory {
                    label: capture.meta.prompt.label(t),
                    points: trajectories[t].clone(),
                    dynamics: Some(motifs[t]),
                })
                .collect();
            let pairs = component_pairs(pca.components.len());
            let counts = dynamics::summary(&dynamics::counts(motifs.iter().map(|d| d.motif)));
            let title = format!("Latent trajectories in PCA space ({counts})");
            let images = plot_trajectories(&out, &title, &drawn, &pairs)?;
            eprintln!("{counts}; wrote {} and {}", images.png.display(), images.svg.display());
        }
        Command::ActivationRanges {
            model,
            huginn_0125: _,
            dtype,
            ids,
            tokens,
            steps,
            seed,
            json,
        } => {
            if dtype == model::Precision::F16 {
                bail!("--dtype f16 would overflow where this measures how far values go; use f32 or bf16");
            }
            let device = cli.device.device_in(dtype)?;
            let (huginn, source) = match model {
                Some(path) => {
                    let path = folder::hub::resolve(&path)?;
                    let huginn = Huginn::from_pretrained_quantized(&path, &device, cli.quantize)?;
                    (huginn, path.display().to_string())
                }
                None => {
                    let config = model::HuginnConfig::default();
                    let element = if dtype == model::Precision::F32 { 4 } else { 2 };
                    if cli.device == Backend::Cpu {
                        let needed = config.num_params().checked_mul(element);
                        infer::limits::check_machine_memory("the model's weights", needed)?;
                    }
                    eprintln!("drawing {:.2} B random weights...", config.num_params() as f64 / 1e9);
                    let huginn = config.init(&device, seed);
                    let huginn = match cli.quantize {
                        Some(bits) => huginn.quantize(bits),
                        None => huginn,
                    };
                    (huginn, format!("random Huginn-0125 weights (seed {seed})"))
                }
            };
            let ids = match ids.is_empty() {
                false => ids,
                true => analysis::ranges::random_ids(huginn.config().vocab_size, tokens, seed),
            };
            let report = analysis::ranges::activation_ranges(&huginn, &ids, steps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.json(&source, dtype.name()))?);
            } else {
                println!("{source}, {}, {} tokens, {steps} steps", dtype.name(), ids.len());
                print!("{}", report.table());
            }
        }
        Command::QuantizationError {
            model,
            text,
            ids,
            depths,
            bits,
            dtype,
            window,
            max_tokens,
            json,
        } => {
            if cli.quantize.is_some() {
                bail!("quantization-error compares the float model with each of --bits; drop --quantize");
            }
            match dtype {
                Some(model::Precision::F32) => bail!("--dtype f32 is the reference itself; give f16 or bf16"),
                Some(_) if cli.device == Backend::Cpu => {
                    bail!("--dtype compares a GPU's float type with f32 on the CPU: give --device wgpu or cuda")
                }
                _ => {}
            }
            if let Some(d) = depths.iter().find(|d| !(1..=1024).contains(*d)) {
                bail!("--depths value {d} is outside 1..=1024");
            }
            if !(2..=1 << 20).contains(&max_tokens) {
                bail!("--max-tokens must be in 2..=1048576 (got {max_tokens})");
            }
            let model = folder::hub::resolve(&model)?;
            // Against another float type the reference is f32 on the CPU, the model's exact sums.
            let float = match dtype {
                Some(_) => Huginn::from_pretrained(&model, &model::burn::prelude::Device::flex())?,
                None => Huginn::from_pretrained(&model, &device)?,
            };
            let context = float.config().block_size;
            let window = window.unwrap_or(context);
            if !(2..=context).contains(&window) {
                bail!("--window must be in 2..={context}, the model's context (got {window})");
            }
            let mut tokens = match (&text, ids.is_empty()) {
                (Some(path), _) => {
                    let tokenizer = find_tokenizer(&model)
                        .with_context(|| format!("--text needs a tokenizer.json beside {}", model.display()))?;
                    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                    Prompt::from_text(&text, &tokenizer)?.tokens
                }
                (None, false) => ids,
                (None, true) => bail!("give tokens to score: --text FILE or --ids 1,2,3"),
            };
            tokens.truncate(max_tokens);
            let windows: Vec<Vec<u32>> = tokens
                .chunks(window)
                .filter(|w| w.len() >= 2)
                .map(<[u32]>::to_vec)
                .collect();
            let mut rows = Vec::new();
            match dtype {
                Some(dtype) => {
                    let other = Huginn::from_pretrained(&model, &cli.device.device_in(dtype)?)?;
                    for d in analysis::quantization::divergence_by_depth(&float, &other, &windows, &depths)? {
                        rows.push((dtype.name().to_string(), d));
                    }
                }
                None => {
                    for bits in bits {
                        let quantized = float.clone().quantize(bits);
                        for d in analysis::quantization::divergence_by_depth(&float, &quantized, &windows, &depths)? {
                            rows.push((bits.count().to_string(), d));
                        }
                    }
                }
            }
            if json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|(format, d)| match dtype {
                        Some(_) => serde_json::json!({"dtype": format, "divergence": d}),
                        None => serde_json::json!({"bits": format.parse::<u8>().ok(), "divergence": d}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let scored: usize = windows.iter().map(Vec::len).sum();
                println!("{scored} tokens in {} windows of up to {window}", windows.len());
                println!(
                    "{:>4}  {:>5}  {:>10}  {:>10}  {:>7}  {:>10}  {:>10}",
                    if dtype.is_some() { "type" } else { "bits" },
                    "depth",
                    "KL mean",
                    "KL max",
                    "top-1",
                    "ppl f32",
                    "ppl other"
                );
                for (format, d) in rows {
                    println!(
                        "{format:>4}  {:>5}  {:>10.3e}  {:>10.3e}  {:>7.4}  {:>10.4}  {:>10.4}",
                        d.depth, d.kl_mean, d.kl_max, d.top1_agreement, d.perplexity_float, d.perplexity_quantized
                    );
                }
            }
        }
        Command::Heatmap { capture, out } => {
            let capture = Capture::load(&capture)?;
            let labels: Vec<String> = (0..capture.positions()).map(|t| capture.meta.prompt.label(t)).collect();
            let title = match capture.meta.reference_steps {
                Some(n) => format!("Distance to the state after {n} iterations"),
                None => format!("Distance to the last captured iterate ({})", capture.meta.steps),
            };
            let images = plot_convergence(&out, &title, &labels, &capture.distances_to_target())?;
            eprintln!("wrote {} and {}", images.png.display(), images.svg.display());
        }
        Command::EvalPlots { report, out } => {
            let tasks = analysis::eval_report::read(&report)?;
            let by_depth: Vec<(String, Vec<(usize, f64)>)> = tasks
                .iter()
                .filter(|t| !t.depths.is_empty())
                .map(|t| (t.name.clone(), t.depths.clone()))
                .collect();
            if !by_depth.is_empty() {
                let base = with_suffix(&out, "-depth");
                let images = plot_depth_curves(
                    &base,
                    "Accuracy against test-time depth",
                    "accuracy",
                    &by_depth,
                    Colours::Categorical,
                )?;
                eprintln!("wrote {} and {}", images.png.display(), images.svg.display());
            }
            let base = with_suffix(&out, "-compute");
            let images = plot_accuracy_against_compute(&base, "Accuracy against compute", &tasks)?;
            eprintln!("wrote {} and {}", images.png.display(), images.svg.display());
        }
        Command::TrainingCurves { metrics, out } => {
            let curves = TrainingCurves::read(&metrics)?;
            let images = plot_training_curves(&out, "Training curves", &curves)?;
            eprintln!("wrote {} and {}", images.png.display(), images.svg.display());
            let metric = if curves.has_accuracy() {
                Metric::Accuracy
            } else {
                Metric::Loss
            };
            let by_depth = curves.by_depth(metric);
            if !by_depth.is_empty() {
                let title = format!("Final {} against test-time depth", metric.name());
                let images = plot_depth_curves(
                    &with_suffix(&out, "-depth"),
                    &title,
                    metric.name(),
                    &by_depth,
                    Colours::Categorical,
                )?;
                eprintln!("wrote {} and {}", images.png.display(), images.svg.display());
            }
        }
        Command::Report {
            run,
            prompt,
            steps,
            reference_steps,
            init,
            components,
            shown,
            out,
        } => {
            let out = out.unwrap_or_else(|| run.join("report"));
            let options = ReportOptions {
                prompt: prompt.input(),
                steps,
                reference_steps,
                init: init.init(),
                components,
                shown,
                ..ReportOptions::default()
            };
            let report = write_report(&run, &out, &options, &device, &progress())
                .with_context(|| format!("report of {}", run.display()))?;
            let counts: Vec<(Motif, usize)> = report.dynamics.counts.into_iter().collect();
            eprintln!(
                "{}; wrote {} figures and {}",
                dynamics::summary(&counts),
                report.figures.len(),
                out.join("index.html").display()
            );
        }
    }
    Ok(())
}

/// The error and its causes on one line, each cause only when the text before does not already
/// say it (many errors quote their source).
fn one_line(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// `tokenizer.json` in the model folder, or in its parent (a run's `final/` sits in the run).
fn find_tokenizer(model: &Path) -> Option<PathBuf> {
    [model.join("tokenizer.json"), model.join("../tokenizer.json")]
        .into_iter()
        .find(|p| p.is_file())
}

/// A step counter on stderr, hidden when stderr is not a terminal.
fn progress() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} steps ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_too_large_to_count_or_to_hold_is_refused() {
        assert_eq!(capture_bytes(3, None, false, 5, 16), Some(4 * 5 * 16 * 4));
        assert_eq!(capture_bytes(3, Some(8), true, 5, 16), Some(5 * 5 * 16 * 8));
        assert_eq!(capture_bytes(usize::MAX, None, false, 1, 1), None);
        let huge = capture_bytes(1024, Some(4096), true, 1 << 20, 65536);
        assert!(huge.is_some());
        assert!(infer::limits::check_machine_memory("states", huge).is_err());
        assert!(infer::limits::check_machine_memory("states", None).is_err());
    }
}
