//! `huginn-bench-generate` (`cargo xtask bench generate`): generation speed of a model shape
//! (random weights) or a model folder on a device: prefill and decode tokens/s, milliseconds per
//! core iteration, mean steps per token, KV-cache bytes per token and peak memory; the median
//! of several runs after a warm-up run. It also counts heap allocations per core iteration: on
//! the CPU backend each tensor operation makes a few (its output and its shape and stride
//! vectors: 3 for a reshape, 5-7 for an element-wise operation, 9-23 for a product), so the
//! count follows the number of operations, machine-independently.
//!
//! ```text
//! huginn-bench-generate --device cpu --width 256 --layers 2,4,2 --steps 32 --batch 1
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::Parser;
use folder::ModelFolder;
use infer::adaptive::{AdaptiveConfig, MAX_STEPS};
use infer::bench::{GenerationBench, measure_diffusion, measure_generation};
use infer::cache::{bytes_per_position, float_bytes};
use infer::diffusion::{DiffusionConfig, DiffusionError};
use infer::exit::Criterion;
use infer::limits::{self, MAX_EXIT_THRESHOLD};
use infer::range::{within, within_f64};
use infer::strategy::Strategy;
use infer::warm_start::WarmStart;
use model::{Backend, Bits, HuginnConfig, Precision, bandwidth, peak_rss_bytes};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "huginn-bench-generate",
    about = "Generation speed of a recurrent-depth model",
    // `--steps -1` is a bad value of --steps (named in the error), not an unknown flag `-1`.
    allow_negative_numbers = true
)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Float type: f32, f16 or bf16 (as the device supports).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Model folder or ORG/NAME[@REVISION]; without it, random weights of the shape below.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random weights in Huginn-0125's shape (h = 5280, 55 heads, (2, 4, 2) layers, MLP 17920,
    /// vocabulary 65536) instead of the shape flags.
    #[arg(long, conflicts_with_all = ["model", "width", "heads", "layers", "vocab_size"])]
    huginn_0125: bool,
    /// Round the linear weights to 8 or 4 bits (groups of 32, f16 scales) before timing.
    #[arg(long)]
    quantize: Option<Bits>,
    /// Measure the machine's memory bandwidth (every core summing 1 GiB) and print decoding's
    /// rate against it: the bytes a core iteration reads (the core's weights and the KV
    /// entries), GB/s, and the fraction of the measured bandwidth. On with --huginn-0125; CPU
    /// only.
    #[arg(long)]
    bandwidth: bool,
    #[arg(long, default_value_t = 256)]
    width: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Prelude, core and coda layers.
    #[arg(long, value_delimiter = ',', default_value = "2,4,2")]
    layers: Vec<usize>,
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Recurrence steps per token (the most, with an exit criterion).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    #[arg(long, default_value = "none")]
    criterion: Criterion,
    /// Default: the criterion's `auto` value.
    #[arg(long)]
    exit_threshold: Option<f64>,
    #[arg(long, default_value = "full")]
    cache: Strategy,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed runs after the warm-up run; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `diffusion`: time the wavefront sampler (batch 1, zero initial states, greedy) next to
    /// sequential decoding at the same --steps.
    #[arg(long, value_parser = ["sequential", "diffusion"], default_value = "sequential")]
    sampler: String,
    /// The wavefront sampler's core steps per wave.
    #[arg(long, default_value_t = 4)]
    inner_recurrence: usize,
    /// New positions per wave.
    #[arg(long, default_value_t = 1)]
    headway: usize,
    /// latent-diff, latent-acceleration-1, latent-acceleration-2, token-stability or fixed.
    #[arg(long, default_value = "latent-diff")]
    freeze_strategy: infer::diffusion::Freeze,
    #[arg(long, default_value_t = 0.03)]
    exit_t: f64,
    #[arg(long, default_value_t = 128)]
    max_wavefront: usize,
}

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() -> ExitCode {
    model::kernels::threads::join_the_pool();
    model::kernels::heap::keep_freed_memory();
    infer::cli::main(run)
}

/// The most timed runs: each is a whole generation.
const MAX_RUNS: usize = 1000;
/// The most rows: far beyond where batching stops paying.
const MAX_BATCH: usize = 4096;
/// The most positions of a random-weight model (its context is set from the flags).
const MAX_POSITIONS: usize = 1 << 20;

/// Ranges of the flags that need no model; those that do are checked once it is known.
fn check(args: &Args) -> Result<()> {
    within("--batch", args.batch, 1, MAX_BATCH)?;
    within("--runs", args.runs, 1, MAX_RUNS)?;
    within("--prompt-len", args.prompt_len, 1, MAX_POSITIONS)?;
    within("--new-tokens", args.new_tokens, 2, MAX_POSITIONS)?;
    within("--steps", args.steps, 1, MAX_STEPS)?;
    within("--inner-recurrence", args.inner_recurrence, 1, MAX_STEPS)?;
    within_f64("--exit-t", args.exit_t, 0.0, MAX_EXIT_THRESHOLD)?;
    if let Some(t) = args.exit_threshold {
        within_f64("--exit-threshold", t, 0.0, MAX_EXIT_THRESHOLD)?;
    }
    if !args.huginn_0125 && args.model.is_none() {
        within("--heads", args.heads, 1, args.width.max(1))?;
        if args.layers.len() != 3 {
            bail!("--layers takes three counts: prelude,core,coda");
        }
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    check(&args)?;
    let device = args.device.device_in(args.dtype)?;
    let element = float_bytes(&device);
    // An accelerator's own memory is not known here: only the CPU's work is checked.
    let on_host = args.device == Backend::Cpu;
    let model = match &args.model {
        Some(dir) => {
            let dir = folder::hub::resolve(dir)?;
            ModelFolder::open_quantized(&dir, &device, args.quantize)
                .with_context(|| format!("loading {}", dir.display()))?
                .model
        }
        None => {
            let [prelude, core, coda] = args.layers[..] else {
                bail!("--layers takes three counts: prelude,core,coda");
            };
            let mut config = if args.huginn_0125 {
                HuginnConfig::default()
            } else {
                HuginnConfig::tiny(args.vocab_size, args.width, args.heads, (prelude, core, coda))
            };
            config.block_size = (args.prompt_len + args.new_tokens).max(256);
            config.validate().context("the model shape")?;
            // Drawn as f32 and then held in the device's float type.
            if on_host {
                let needed = config.num_params().checked_mul(4 + element);
                limits::check_machine_memory("the model's weights", needed)?;
            }
            let model = if args.huginn_0125 {
                // 3.5 billion values: drawn by the device, not sampled on the host.
                config.init_on_device(&device)
            } else {
                config.init(&device, 0)
            };
            match args.quantize {
                Some(bits) => model.quantize(bits),
                None => model,
            }
        }
    };
    let positions = args.prompt_len + args.new_tokens;
    let needed = limits::kv_cache_bytes(model.config(), args.cache, args.steps, positions, args.batch, element);
    if on_host {
        limits::check_machine_memory("the benchmark's KV cache", needed)?;
    }
    let bench = GenerationBench {
        batch: args.batch,
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        runs: args.runs,
        config: AdaptiveConfig {
            criterion: args.criterion,
            threshold: args.exit_threshold.unwrap_or(args.criterion.auto_threshold()),
            max_steps: args.steps,
            warm_start: WarmStart::Cold,
            strategy: args.cache,
        },
    };
    eprintln!("warm-up run, then {} timed", args.runs);
    let counted = || ALLOCATIONS.load(Ordering::Relaxed);
    let median = measure_generation(&model, &bench, Some(&counted))?;
    let diffusion = if args.sampler == "diffusion" {
        if args.batch != 1 || args.criterion != Criterion::None {
            bail!("--sampler diffusion runs batch 1 without an exit criterion");
        }
        let config = DiffusionConfig {
            num_steps: args.steps,
            inner_recurrence: args.inner_recurrence,
            headway: args.headway,
            freeze: args.freeze_strategy,
            exit_t: args.exit_t,
            max_wavefront: args.max_wavefront,
            init_scale: 0.0,
            ..DiffusionConfig::default()
        };
        config
            .check(model.config(), args.prompt_len, args.new_tokens)
            .map_err(|e| match e {
                DiffusionError::Range(r) => {
                    let name = format!("--{}", r.name.replace('_', "-"));
                    anyhow::Error::from(r.named(name))
                }
                other => other.into(),
            })?;
        let needed = config.memory_bytes(model.config(), args.prompt_len, args.new_tokens, element);
        if on_host {
            limits::check_machine_memory("the wavefront sampler's cache and waves", needed)?;
        }
        Some(measure_diffusion(
            &model,
            args.prompt_len,
            args.new_tokens,
            args.runs,
            &config,
        )?)
    } else {
        None
    };
    let kv_bytes = bytes_per_position(args.cache, model.config(), args.steps, element);
    let c = model.config();
    let streamed = (args.bandwidth || args.huginn_0125).then(|| -> Result<_> {
        if !on_host {
            bail!(
                "--bandwidth measures the CPU's memory; the device here is {:?}",
                args.device
            );
        }
        // A decoding iteration reads the core's weights once for the batch, and each row's
        // keys and values of every core layer at the positions so far (on average the prompt
        // and half the new tokens).
        // Quantized linears are one byte a level on the CPU (Flex keeps 4-bit levels in `i8`
        // too) and an f32 scale per group.
        let weights = match args.quantize {
            Some(_) => {
                let linear = c.core_linear_params();
                (c.core_params() - linear) * element + linear + linear.div_ceil(model::quantize::GROUP) * 4
            }
            None => c.core_params() * element,
        };
        let positions = args.prompt_len + args.new_tokens / 2;
        let kv = args.batch * c.n_layers_in_recurrent_block * 2 * c.n_embd * element * positions;
        let bytes = (weights + kv) as f64;
        limits::check_machine_memory("the bandwidth probe's buffer", Some(bandwidth::PROBE_BYTES))?;
        let measured = bandwidth::measure(bandwidth::PROBE_BYTES);
        let rate = bytes / (median.ms_per_core_iteration / 1e3);
        Ok(json!({
            "bytes_per_core_iteration": bytes, "streamed_bytes_per_second": rate,
            "measured_bytes_per_second": measured, "fraction_of_bandwidth": rate / measured,
        }))
    });
    let streamed = streamed.transpose()?;
    let layers = [c.n_layers_in_prelude, c.n_layers_in_recurrent_block, c.n_layers_in_coda];
    let figures = json!({
        "device": format!("{:?}", args.device), "dtype": args.dtype.name(),
        "quantize": args.quantize.map(|b| b.count()), "width": model.config().n_embd,
        "layers": layers, "parameters": c.num_params(),
        "steps": args.steps, "criterion": args.criterion.name(), "cache": args.cache.to_string(),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs,
        "prefill_tokens_per_second": median.prefill_tokens_per_second,
        "decode_tokens_per_second": median.decode_tokens_per_second,
        "ms_per_core_iteration": median.ms_per_core_iteration,
        "allocations_per_core_iteration": median.allocations_per_core_iteration,
        "mean_steps_per_token": median.mean_steps_per_token,
        "kv_bytes_per_token": kv_bytes,
        "peak_memory_bytes": peak_rss_bytes(),
        "bandwidth": streamed,
        "diffusion": diffusion.map(|d| json!({
            "inner_recurrence": args.inner_recurrence, "headway": args.headway,
            "freeze_strategy": args.freeze_strategy.name(), "exit_t": args.exit_t, "max_wavefront": args.max_wavefront,
            "figures": d,
        })),
    });
    println!(
        "{}{} (width {}, layers {:?}, {:.1}M parameters), batch {}, {} prompt + {} new tokens, {} steps ({}), cache {}",
        if args.model.is_some() {
            "model folder"
        } else {
            "random weights"
        },
        match model.config().quantization.as_ref() {
            Some(q) => format!(", {}-bit linears", q.bits.count()),
            None => String::new(),
        },
        model.config().n_embd,
        layers,
        model.config().num_params() as f64 / 1e6,
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.steps,
        args.criterion.name(),
        args.cache
    );
    println!(
        "prefill {:.1} tok/s · decode {:.2} tok/s · {:.3} ms per core iteration · mean {:.1} steps/token",
        median.prefill_tokens_per_second,
        median.decode_tokens_per_second,
        median.ms_per_core_iteration,
        median.mean_steps_per_token
    );
    if let Some(s) = &streamed {
        let gb = |key: &str| s[key].as_f64().unwrap_or(f64::NAN) / 1e9;
        println!(
            "a core iteration reads {:.3} GB (core weights and KV) · {:.1} GB/s · measured bandwidth {:.1} GB/s (1 GiB summed on every core) · {:.0}% of it",
            gb("bytes_per_core_iteration"),
            gb("streamed_bytes_per_second"),
            gb("measured_bytes_per_second"),
            100.0 * s["fraction_of_bandwidth"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "{:.0} heap allocations per core iteration",
        median.allocations_per_core_iteration.unwrap_or(0.0)
    );
    println!(
        "KV cache {:.1} KiB per token · peak memory {}",
        kv_bytes as f64 / 1024.0,
        peak_rss_bytes().map_or("unknown".into(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
    );
    if let Some(d) = diffusion {
        println!(
            "diffusion ({}, inner {}, headway {}, wavefront ≤ {}): prefill {:.1} tok/s · decode {:.2} tok/s · {:.2} core passes and {:.1} position-steps per token ({} per token sequentially) · {} waves · first {} of {} tokens equal sequential greedy",
            args.freeze_strategy,
            args.inner_recurrence,
            args.headway,
            args.max_wavefront,
            d.prefill_tokens_per_second,
            d.decode_tokens_per_second,
            d.core_passes_per_token,
            d.position_steps_per_token,
            args.steps,
            d.waves,
            d.agreeing_prefix,
            d.compared
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
