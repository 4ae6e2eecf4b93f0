//! `huginn-gpu-check`: the accelerator check of the inference and training work, as one binary
//! so that it can be carried, built, to a machine with a GPU and no Rust toolchain
//! (`scripts/gpu-check.sh` packs it; docs/backends.md's "GPU check" says how to run it). On one
//! device it runs, in order:
//!
//! 1. **parity**: every reference fixture folder given (forward, training gradients,
//!    generation), as `huginn check-fixture` does;
//! 2. **generation speed** at Huginn-0125's shape with random weights (batch 1, r = 32, full
//!    cache), in the first float type the device takes of bf16, f16 and f32, against the
//!    limit set by re-reading the core's weights every iteration at `--bandwidth-gbs`;
//!    then the same with the linear weights in 8 and in 4 bits (**quantized**), against the
//!    limit their packed bytes set;
//! 3. **training speed**: `--train-steps` optimizer steps of a small model (h = 256, (2, 4, 2),
//!    r̄ = 8, k = 4, sequence 256, batch 8);
//! 4. **scaling**: the same model trained on every device of the backend the machine has, on
//!    the first 1, 2, …, n of them (`--scale-steps` steps each, batch 8 per device), with the
//!    speed-up over one; a machine with one device says so.
//!
//! Each stage runs in a process of its own (the program runs itself), and a stage that fails
//! does not stop the others. It prints a table and writes every figure to
//! `<out>/gpu-check.json`. `--small` shrinks the shapes so the whole check runs in seconds on a
//! CPU (its test).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use infer::adaptive::AdaptiveConfig;
use infer::bench::{GenerationBench, measure_generation};
use infer::cache::float_bytes;
use infer::exit::Criterion;
use infer::fixture_report::{Summary, check_dir};
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::burn::module::Module;
use model::{Backend, Bits, Huginn, HuginnConfig, Precision};
use serde_json::{Value, json};
use train::bench::{BenchConfig, measure};
use train::depth::DepthScheme;

#[derive(Parser, Debug)]
#[command(name = "huginn-gpu-check", about = "Parity and speed of the model on one device")]
struct Args {
    #[arg(long, default_value = "wgpu")]
    device: Backend,
    /// Reference fixture folders to check for parity.
    #[arg(long = "fixtures", num_args = 1..)]
    fixtures: Vec<PathBuf>,
    /// Where gpu-check.json goes.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Recurrence steps per generated token.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Timed generation runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Optimizer steps of the training measurement (0: skip it).
    #[arg(long, default_value_t = 300)]
    train_steps: u64,
    /// Optimizer steps of each scaling measurement (0: skip it).
    #[arg(long, default_value_t = 100)]
    scale_steps: u64,
    /// The device's memory bandwidth in GB/s, for the generation limit (an H200: 4800).
    #[arg(long, default_value_t = 4800.0)]
    bandwidth_gbs: f64,
    /// Tiny shapes instead of Huginn-0125's: a smoke test in seconds.
    #[arg(long)]
    small: bool,
    /// Run one stage in this process (what the check does for each stage).
    #[arg(long, hide = true)]
    stage: Option<Stage>,
}

fn main() -> ExitCode {
    infer::cli::main(run)
}

/// One part of the check. Each runs in a process of its own: a device's float type is set
/// once per process, and parity needs f32 while generation wants bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stage {
    Parity,
    Generate,
    Quantized,
    Train,
    Scale,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Parity => "parity",
            Stage::Generate => "generate",
            Stage::Quantized => "quantized",
            Stage::Train => "train",
            Stage::Scale => "scale",
        }
    }
}

fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    if let Some(stage) = args.stage {
        let (line, figures) = match stage {
            Stage::Parity => parity(&args)?,
            Stage::Generate => generate(&args, None)?,
            Stage::Quantized => {
                let (eight, eight_figures) = generate(&args, Some(Bits::Eight))?;
                let (four, four_figures) = generate(&args, Some(Bits::Four))?;
                (
                    format!("{eight}\n{four}"),
                    json!({ "8": eight_figures, "4": four_figures }),
                )
            }
            Stage::Train => train(&args)?,
            Stage::Scale => scale(&args)?,
        };
        write_json(&args.out.join(format!("gpu-check-{}.json", stage.name())), &figures)?;
        println!("{line}");
        return Ok(());
    }
    let started = Instant::now();
    let mut stages = vec![Stage::Generate, Stage::Quantized];
    if !args.fixtures.is_empty() {
        stages.insert(0, Stage::Parity);
    }
    if args.train_steps > 0 {
        stages.push(Stage::Train);
    }
    if args.scale_steps > 0 {
        stages.push(Stage::Scale);
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let mut report = json!({ "device": args.device.name() });
    let (mut table, mut failed) = (Vec::new(), Vec::new());
    for stage in stages {
        eprintln!("== {}", stage.name());
        let output = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .args(["--stage", stage.name()])
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !output.status.success() {
            table.push(format!("{}: FAILED ({})", stage.name(), output.status));
            failed.push(stage.name());
            continue;
        }
        table.push(String::from_utf8_lossy(&output.stdout).trim().to_string());
        let path = args.out.join(format!("gpu-check-{}.json", stage.name()));
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        report[stage.name()] = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    }
    report["wall_seconds"] = Value::from(started.elapsed().as_secs_f64());
    let path = args.out.join("gpu-check.json");
    write_json(&path, &report)?;
    for line in &table {
        println!("{line}");
    }
    println!("figures: {}", path.display());
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?).with_context(|| format!("writing {}", path.display()))
}

/// The reference fixtures, in f32.
fn parity(args: &Args) -> Result<(String, Value)> {
    let device = args.device.device().context("opening the device")?;
    let reports = args
        .fixtures
        .iter()
        .map(|dir| check_dir(dir, &device).with_context(|| format!("checking {}", dir.display())))
        .collect::<Result<Vec<_>>>()?;
    let summary = Summary::of(&reports);
    let line = format!(
        "parity (f32): {} forward, {} train, {} generate checks, {} failed, forward max |err| {:.1e}",
        summary.forward.checked,
        summary.train.checked,
        summary.generate.checked,
        summary.forward.failed + summary.train.failed + summary.generate.failed,
        summary.forward.max_abs_err
    );
    if !summary.passed() {
        bail!("{line}");
    }
    Ok((line, serde_json::to_value(&summary)?))
}

/// Generation at Huginn-0125's shape, in the narrowest float type the device takes, with the
/// linear weights rounded to `bits` if given (drawn in float first, then rounded one weight at
/// a time).
fn generate(args: &Args, bits: Option<Bits>) -> Result<(String, Value)> {
    let (device, precision) = [Precision::Bf16, Precision::F16, Precision::F32]
        .into_iter()
        .find_map(|p| args.device.device_in(p).ok().map(|d| (d, p)))
        .context("the device takes no float type")?;
    let config = if args.small {
        HuginnConfig::tiny(512, 64, 4, (2, 4, 2))
    } else {
        HuginnConfig::default()
    };
    let loading = Instant::now();
    let model = config.init_on_device(&device);
    let model = match bits {
        Some(bits) => model.quantize(bits),
        None => model,
    };
    let init_seconds = loading.elapsed().as_secs_f64();
    let bench = GenerationBench {
        batch: 1,
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        runs: args.runs,
        config: AdaptiveConfig {
            criterion: Criterion::None,
            threshold: 0.0,
            max_steps: args.steps,
            warm_start: WarmStart::Cold,
            strategy: Strategy::default(),
        },
    };
    let figures = measure_generation(&model, &bench, None)?;
    let limit = bandwidth_limit(&model, args.steps, float_bytes(&device), bits, args.bandwidth_gbs);
    let line = format!(
        "generate ({}{}, {:.1}M parameters, r = {}, batch 1): prefill {:.1} tok/s, decode {:.2} tok/s = {:.1}% of \
         the {:.1} tok/s bandwidth limit, {:.3} ms per core iteration",
        precision.name(),
        bits.map_or(String::new(), |b| format!(", {}-bit linears", b.count())),
        model.num_params() as f64 / 1e6,
        args.steps,
        figures.prefill_tokens_per_second,
        figures.decode_tokens_per_second,
        100.0 * figures.decode_tokens_per_second / limit,
        limit,
        figures.ms_per_core_iteration
    );
    let value = json!({
        "dtype": precision.name(), "bits": bits.map(|b| b.count()), "parameters": model.num_params(), "steps": args.steps,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs,
        "init_seconds": init_seconds, "figures": figures,
        "bandwidth_gbs": args.bandwidth_gbs, "limit_tokens_per_second": limit,
    });
    Ok((line, value))
}

/// Training speed of a small model.
/// The training measurement's model, `steps` steps.
fn train_config(args: &Args, steps: u64) -> BenchConfig {
    let (width, seq_len) = if args.small { (64, 64) } else { (256, 256) };
    BenchConfig {
        width,
        heads: 4,
        layers: (2, 4, 2),
        vocab_size: 2048,
        seq_len,
        batch_size: 8,
        depth: DepthScheme::PoissonLognormalFilling { mean: 8, backprop: 4 },
        steps,
    }
}

fn train(args: &Args) -> Result<(String, Value)> {
    let device = args.device.device().context("opening the device")?.autodiff();
    let config = train_config(args, args.train_steps);
    let (width, seq_len) = (config.width, config.seq_len);
    let result = measure(&config, &[device])?;
    let line = format!(
        "train (h = {width}, (2, 4, 2), r̄ = 8, k = 4, sequence {seq_len}, batch 8, {} steps): {:.0} tok/s, \
         {:.3} s per step, device pool {}",
        args.train_steps,
        result.tokens_per_second,
        result.seconds_per_step,
        result.device_reserved_bytes.map_or("not reported".into(), |b| format!(
            "{:.0} MiB",
            b as f64 / (1 << 20) as f64
        ))
    );
    let value = json!({ "width": width, "seq_len": seq_len, "steps": args.train_steps, "result": result });
    Ok((line, value))
}

/// Training speed on the first 1, 2, …, n of the backend's n devices, one micro-batch per device
/// and step.
fn scale(args: &Args) -> Result<(String, Value)> {
    let cards = args.device.gpus().context("listing the devices")?;
    // A driver that reports no bus address leaves no card identified: then every adapter.
    let identified = !cards.is_empty();
    let devices = match identified {
        true => cards,
        false => {
            eprintln!(
                "no {} device is identified as a card on a bus: training on every one listed",
                args.device.name()
            );
            args.device.devices()?
        }
    };
    let devices: Vec<_> = devices.into_iter().map(|d| d.autodiff()).collect();
    let config = train_config(args, args.scale_steps);
    let mut runs = Vec::new();
    for n in 1..=devices.len() {
        eprintln!("training on {n} of {} {} device(s)", devices.len(), args.device.name());
        runs.push(measure(&config, &devices[..n])?);
    }
    let one = runs[0].tokens_per_second;
    let line = match &runs[..] {
        [only] => format!(
            "scale: one {} device on this machine, nothing to scale ({:.0} tok/s on it)",
            args.device.name(),
            only.tokens_per_second
        ),
        _ => format!(
            "scale (batch 8 per device, {} steps): {}",
            args.scale_steps,
            runs.iter()
                .enumerate()
                .map(|(i, r)| format!(
                    "{} device(s) {:.0} tok/s (×{:.2})",
                    i + 1,
                    r.tokens_per_second,
                    r.tokens_per_second / one
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let value = json!({
        "devices": devices.len(),
        "cards_identified": identified,
        "steps": args.scale_steps,
        "runs": runs.iter().enumerate().map(|(i, r)| json!({
            "devices": i + 1,
            "tokens_per_second": r.tokens_per_second,
            "seconds_per_step": r.seconds_per_step,
            "speedup": r.tokens_per_second / one,
        })).collect::<Vec<_>>(),
    });
    Ok((line, value))
}

/// Decoded tokens per second if every byte of weights a token reads came at `bandwidth_gbs`:
/// the core and adapter are read once per iteration, everything else once per token.
fn bandwidth_limit(model: &Huginn, steps: usize, element_bytes: usize, bits: Option<Bits>, bandwidth_gbs: f64) -> f64 {
    let core = model.core_block.num_params() + model.adapter.num_params();
    let rest = model.num_params() - core;
    let element = element_bytes as f64;
    // Packed on the device: the levels' bits and an f16 scale per group of 32.
    let core_bytes = match bits {
        Some(bits) => {
            let linear = model.config().core_linear_params();
            let per_value = f64::from(bits.count()) / 8.0 + 2.0 / model::quantize::GROUP as f64;
            linear as f64 * per_value + (core - linear) as f64 * element
        }
        None => core as f64 * element,
    };
    bandwidth_gbs * 1e9 / (core_bytes * steps as f64 + rest as f64 * element)
}
