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
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use infer::adaptive::{AdaptiveConfig, Row, generate_rows};
use infer::cache::{bytes_per_position, float_bytes};
use infer::exit::Criterion;
use infer::folder::ModelFolder;
use infer::greedy::WarmStart;
use infer::strategy::Strategy;
use model::{Backend, Huginn, HuginnConfig, Precision, peak_rss_bytes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "huginn-bench-generate",
    about = "Generation speed of a recurrent-depth model"
)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Float type: f32, f16 or bf16 (as the device supports).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Model folder; without it, random weights of the shape below.
    #[arg(long)]
    model: Option<PathBuf>,
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

/// One timed generation.
struct Run {
    prefill_seconds: f64,
    decode_seconds: f64,
    /// Core iterations the batch ran after the first token (each row's token takes its steps;
    /// the batch runs the most of them).
    decode_iterations: usize,
    /// Heap allocations while decoding (after the first token).
    decode_allocations: u64,
    mean_steps: f64,
}

fn main() -> ExitCode {
    infer::cli::main(run)
}

fn run(args: Args) -> Result<()> {
    if args.batch == 0 || args.prompt_len == 0 || args.new_tokens < 2 || args.runs == 0 || args.steps == 0 {
        bail!("--batch, --prompt-len, --runs and --steps must be at least 1, --new-tokens at least 2");
    }
    let device = args.device.device_in(args.dtype)?;
    let model = match &args.model {
        Some(dir) => {
            ModelFolder::open(dir, &device)
                .with_context(|| format!("loading {}", dir.display()))?
                .model
        }
        None => {
            let [prelude, core, coda] = args.layers[..] else {
                bail!("--layers takes three counts: prelude,core,coda");
            };
            let mut config = HuginnConfig::tiny(args.vocab_size, args.width, args.heads, (prelude, core, coda));
            config.block_size = (args.prompt_len + args.new_tokens).max(256);
            config.validate().context("the model shape")?;
            config.init(&device, 0)
        }
    };
    let config = AdaptiveConfig {
        criterion: args.criterion,
        threshold: args.exit_threshold.unwrap_or(args.criterion.auto_threshold()),
        max_steps: args.steps,
        warm_start: WarmStart::Cold,
        strategy: args.cache,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let vocab = model.config().vocab_size as u32;
    let rows: Vec<Row> = (0..args.batch)
        .map(|_| Row {
            prompt: (0..args.prompt_len).map(|_| rng.random_range(0..vocab)).collect(),
            max_new: args.new_tokens,
            ..Row::default()
        })
        .collect();
    eprintln!("warm-up run, then {} timed", args.runs);
    once(&model, &rows, config)?;
    let mut runs = (0..args.runs)
        .map(|_| once(&model, &rows, config))
        .collect::<Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.decode_seconds.total_cmp(&b.decode_seconds));
    let median = &runs[runs.len() / 2];
    let tokens = (args.batch * args.prompt_len) as f64;
    let decoded = (args.batch * (args.new_tokens - 1)) as f64;
    let kv_bytes = bytes_per_position(args.cache, model.config(), args.steps, float_bytes(&device));
    let figures = json!({
        "device": format!("{:?}", args.device), "dtype": args.dtype.name(), "width": model.config().n_embd,
        "layers": [model.config().n_layers_in_prelude, model.config().n_layers_in_recurrent_block, model.config().n_layers_in_coda],
        "steps": args.steps, "criterion": args.criterion.name(), "cache": args.cache.to_string(),
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "runs": args.runs,
        "prefill_tokens_per_second": tokens / median.prefill_seconds,
        "decode_tokens_per_second": decoded / median.decode_seconds,
        "ms_per_core_iteration": median.decode_seconds * 1e3 / median.decode_iterations as f64,
        "allocations_per_core_iteration": median.decode_allocations as f64 / median.decode_iterations as f64,
        "mean_steps_per_token": median.mean_steps,
        "kv_bytes_per_token": kv_bytes,
        "peak_memory_bytes": peak_rss_bytes(),
    });
    println!(
        "{} (width {}, layers {:?}), batch {}, {} prompt + {} new tokens, {} steps ({}), cache {}",
        if args.model.is_some() {
            "model folder"
        } else {
            "random weights"
        },
        model.config().n_embd,
        args.layers,
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.steps,
        args.criterion.name(),
        args.cache
    );
    println!(
        "prefill {:.1} tok/s · decode {:.2} tok/s · {:.3} ms per core iteration · mean {:.1} steps/token",
        figures["prefill_tokens_per_second"].as_f64().unwrap_or(0.0),
        figures["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
        figures["ms_per_core_iteration"].as_f64().unwrap_or(0.0),
        median.mean_steps
    );
    println!(
        "{:.0} heap allocations per core iteration",
        figures["allocations_per_core_iteration"].as_f64().unwrap_or(0.0)
    );
    println!(
        "KV cache {:.1} KiB per token · peak memory {}",
        kv_bytes as f64 / 1024.0,
        peak_rss_bytes().map_or("unknown".into(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn once(model: &Huginn, rows: &[Row], config: AdaptiveConfig) -> Result<Run> {
    let started = Instant::now();
    let mut first = None;
    let mut allocations_at_first = 0;
    // Per generated position: the most steps any row took (what the batch ran).
    let mut iterations: Vec<usize> = Vec::new();
    let mut seen = vec![0usize; rows.len()];
    let out = generate_rows(model, rows, config, |b, _, steps| {
        first.get_or_insert_with(|| {
            allocations_at_first = ALLOCATIONS.load(Ordering::Relaxed);
            Instant::now()
        });
        let i = seen[b];
        seen[b] += 1;
        if iterations.len() <= i {
            iterations.push(0);
        }
        iterations[i] = iterations[i].max(steps);
        std::ops::ControlFlow::Continue(())
    })?;
    let done = Instant::now();
    let decode_allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_at_first;
    let first = first.context("no token generated")?;
    let steps: Vec<usize> = out.iter().flat_map(|g| g.steps_per_token.iter().copied()).collect();
    Ok(Run {
        prefill_seconds: (first - started).as_secs_f64(),
        decode_seconds: (done - first).as_secs_f64(),
        decode_iterations: iterations[1..].iter().sum::<usize>().max(1),
        decode_allocations,
        mean_steps: steps.iter().sum::<usize>() as f64 / steps.len() as f64,
    })
}
