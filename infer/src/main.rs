//! `huginn`: the command line for recurrent-depth models.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use infer::adaptive::{self, AdaptiveConfig, Decoding};
use infer::depths::predictions_by_depth;
use infer::exit::Criterion;
use infer::fixture_report::{Summary, check_dir};
use infer::greedy::WarmStart;
use infer::sampling::SamplingConfig;
use infer::strategy::Strategy;
use model::burn::prelude::Device;
use model::{Backend, Huginn, HuginnConfig, InitialState};

#[derive(Parser)]
#[command(
    name = "huginn",
    version,
    about = "Recurrent-depth language models (Huginn-0125 and friends)"
)]
struct Cli {
    /// Compute backend: cpu, wgpu or cuda (those compiled into this binary).
    #[arg(long, global = true, default_value = "cpu")]
    device: Backend,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the next-token prediction after each recurrence step.
    Depths {
        /// Model folder (config.json + safetensors or model.bpk). Without it, a random tiny model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt token ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Deepest recurrence to run.
        #[arg(long, default_value_t = 32)]
        max_depth: usize,
        /// Depths to report (default: powers of two up to --max-depth).
        #[arg(long, value_delimiter = ',')]
        depths: Vec<usize>,
        /// Candidates shown per depth.
        #[arg(long, default_value_t = 3)]
        top: usize,
        /// Random initial state from this seed (the reference's like-init) instead of zeros.
        #[arg(long)]
        seed: Option<u64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Greedy generation, each token with up to --steps recurrence steps and an optional
    /// per-token exit criterion (token ids in; token ids and steps per token out).
    Generate {
        /// Model folder. Without it, a random tiny model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prompt token ids, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Recurrence steps per token (the most, with an exit criterion).
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Exit criterion: none, kl, minp-kl, entropy-diff, latent-diff, cosine, argmax-stability.
        #[arg(long, default_value = "none")]
        criterion: Criterion,
        /// Exit threshold (default: the criterion's "auto" value from the reference).
        #[arg(long)]
        exit_threshold: Option<f64>,
        /// KV-cache strategy by its reference name: full, latest-m4, available-m4,
        /// always-last-m4, skip, optionally with -compress-sK, -compress-rK or -compress-anchor.
        #[arg(long, default_value = "full")]
        cache: Strategy,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long)]
        min_p: Option<f32>,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Token ids that end generation, comma separated.
        #[arg(long, value_delimiter = ',')]
        stop: Vec<u32>,
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// Where each new token's recurrence starts.
        #[arg(long, value_enum, default_value_t = WarmStart::Cold)]
        warm_start: WarmStart,
    },
    /// Check a model against reference fixture folders (config.json, model.safetensors,
    /// expected.safetensors, generate.json).
    CheckFixture {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Print one JSON summary instead of a line per check.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let device = cli.device.device()?;
    match cli.command {
        Command::Depths {
            model,
            ids,
            max_depth,
            depths,
            top,
            seed,
            json,
        } => {
            let model = load(model.as_deref(), &device)?;
            if max_depth == 0 {
                bail!("--max-depth must be at least 1");
            }
            let depths = if depths.is_empty() {
                (0..).map(|p| 1 << p).take_while(|d| *d <= max_depth).collect()
            } else {
                depths
            };
            if let Some(d) = depths.iter().find(|d| **d == 0 || **d > max_depth) {
                bail!("--depths value {d} is outside 1..={max_depth}");
            }
            let init = seed.map_or(InitialState::Zeros, |seed| InitialState::LikeInit { seed, scale: 1.0 });
            let preds = predictions_by_depth(&model, &ids, max_depth, &depths, &init, top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&preds)?);
            } else {
                println!(
                    "{:>5}  {:>8}  {:>9}  top next tokens (id: probability)",
                    "depth", "entropy", "residual"
                );
                for p in preds {
                    let top: Vec<String> = p.top.iter().map(|(id, prob)| format!("{id}: {prob:.3}")).collect();
                    println!(
                        "{:>5}  {:>8.3}  {:>9.2e}  {}",
                        p.depth,
                        p.entropy,
                        p.relative_residual,
                        top.join("  ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            model,
            ids,
            steps,
            max_new_tokens,
            warm_start,
            criterion,
            exit_threshold,
            cache,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            stop,
        } => {
            let sampling = SamplingConfig {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                seed,
            };
            sampling.validate().map_err(anyhow::Error::msg)?;
            let model = load(model.as_deref(), &device)?;
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            let threshold = exit_threshold.unwrap_or(criterion.auto_threshold());
            let config = AdaptiveConfig {
                criterion,
                threshold,
                max_steps: steps,
                warm_start,
                strategy: cache,
            };
            let decoding = Decoding {
                sampling,
                stop_tokens: stop,
            };
            let out = adaptive::generate_batch_with(&model, &[ids], max_new_tokens, config, &decoding)?
                .pop()
                .expect("one row");
            let ids: Vec<String> = out.tokens.iter().map(u32::to_string).collect();
            println!("{}", ids.join(","));
            let steps: Vec<String> = out.steps_per_token.iter().map(usize::to_string).collect();
            let mean = out.steps_per_token.iter().sum::<usize>() as f64 / out.steps_per_token.len().max(1) as f64;
            eprintln!("steps per token: {} (mean {mean:.2})", steps.join(","));
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckFixture { dirs, json } => {
            let mut reports = Vec::new();
            for dir in &dirs {
                let report = check_dir(dir, &device).with_context(|| format!("checking {}", dir.display()))?;
                if !json {
                    println!("== {}", dir.display());
                    for check in report.forward.iter().chain(&report.train).chain(&report.generate) {
                        println!("{check}");
                    }
                    if !report.generate_unsupported.is_empty() {
                        println!(
                            "     generate.json: {} runs not checked by this build",
                            report.generate_unsupported.len()
                        );
                    }
                }
                reports.push(report);
            }
            let summary = Summary::of(&reports);
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!(
                    "forward: {} checked, {} failed, max |err| {:.3e}; train: {} checked, {} failed; \
                     generate: {} checked, {} failed, {} runs unsupported",
                    summary.forward.checked,
                    summary.forward.failed,
                    summary.forward.max_abs_err,
                    summary.train.checked,
                    summary.train.failed,
                    summary.generate.checked,
                    summary.generate.failed,
                    summary.generate.unsupported.len()
                );
            }
            Ok(if summary.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn load(dir: Option<&std::path::Path>, device: &Device) -> Result<Huginn> {
    match dir {
        Some(dir) => Huginn::from_pretrained(dir, device).with_context(|| format!("loading {}", dir.display())),
        None => Ok(HuginnConfig::tiny(256, 64, 4, (1, 2, 1)).init(device, 0)),
    }
}
