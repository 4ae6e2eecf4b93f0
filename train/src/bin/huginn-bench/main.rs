//! `huginn-bench`: training tokens/s and peak memory of a model shape and depth on a device, and
//! the memory of a shallow and a deep fixed recurrence with the same backprop depth k, which
//! should be about equal: the first `r − k` iterations run on a copy of the model without
//! autodiff, so they record no graph.
//!
//! ```text
//! huginn-bench --device cpu --width 256 --layers 2,4,2 --mean-depth 8 --backprop 4 --seq-len 256 --batch-size 8
//! huginn-bench --devices wgpu:0,wgpu:1     # tokens/s on 1 and 2 devices, batch 8 on each
//! huginn-bench --devices cpu --handles 2   # the CPU's one device through 1 and 2 handles
//! ```
//!
//! Each measurement runs in a fresh child process (this binary with `--child`), so each peak
//! RSS belongs to one configuration alone.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use burn::prelude::Device;
use clap::Parser;
use model::{Backend, DeviceSpec, HuginnConfig};
use serde_json::json;
use train::bench::{BenchConfig, BenchResult, measure};
use train::depth::DepthScheme;
use train::layout::parse_layers;
use train::limits::{
    MAX_BATCH, MAX_EVAL_DEPTH, MAX_HEADS, MAX_MEAN_DEPTH, MAX_SEQ_LEN, MAX_STEPS, MAX_VOCAB, MAX_WIDTH, count, count64,
};
use train::memory::Shapes;

/// Handles per device (`--handles`): threads and replicas sharing one device.
const MAX_HANDLES: u64 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "huginn-bench",
    version,
    about = "Training speed and memory of a recurrent-depth model on a device."
)]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Measure scaling instead: the randomized-depth speed on the first 1, 2, …, n devices of
    /// this list (one backend), one micro-batch of --batch-size rows per device and step.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    devices: Vec<DeviceSpec>,
    /// With --devices: use each device through this many handles (a thread and replica each),
    /// listed in turn after the devices themselves; how the CPU's one device is measured.
    #[arg(long, default_value_t = 1, value_parser = count::<1, MAX_HANDLES>)]
    handles: usize,
    #[arg(long, default_value_t = 256, value_parser = count::<1, MAX_WIDTH>)]
    width: usize,
    #[arg(long, default_value_t = 4, value_parser = count::<1, MAX_HEADS>)]
    heads: usize,
    /// Prelude, core and coda layers.
    #[arg(long, default_value = "2,4,2", value_parser = parse_layers)]
    layers: (usize, usize, usize),
    #[arg(long, default_value_t = 2048, value_parser = count::<1, MAX_VOCAB>)]
    vocab_size: usize,
    /// Mean recurrence r̄ of the randomized (Poisson log-normal) depth.
    #[arg(long, default_value_t = 8, value_parser = count::<1, MAX_MEAN_DEPTH>)]
    mean_depth: usize,
    /// Recurrence steps with gradient, k.
    #[arg(long, default_value_t = 4, value_parser = count::<1, MAX_MEAN_DEPTH>)]
    backprop: usize,
    #[arg(long, default_value_t = 256, value_parser = count::<1, MAX_SEQ_LEN>)]
    seq_len: usize,
    /// Rows per step (one micro-batch); 8 takes about a minute per measurement on 2 CPU cores.
    #[arg(long, default_value_t = 8, value_parser = count::<1, MAX_BATCH>)]
    batch_size: usize,
    /// Timed optimizer steps of the randomized-depth measurement (after one warm-up step).
    #[arg(long, default_value_t = 5, value_parser = count64::<1, MAX_STEPS>)]
    steps: u64,
    /// Fixed total depths whose memory is compared.
    #[arg(long, value_delimiter = ',', default_value = "8,64", value_parser = count::<1, MAX_EVAL_DEPTH>)]
    memory_depths: Vec<usize>,
    /// Timed steps of each fixed-depth measurement.
    #[arg(long, default_value_t = 1, value_parser = count64::<1, MAX_STEPS>)]
    memory_steps: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure one depth (`random`, or `fixed:R`) in this process and print its result as JSON:
    /// what the parent runs in each child.
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// A depth to measure.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Depth {
    /// The paper's Poisson log-normal depth with mean `--mean-depth`.
    Random,
    /// Always `r` iterations, the last `--backprop` with gradient.
    Fixed(usize),
    /// The randomized depth on the first `n` workers of `--devices` × `--handles`.
    Workers(usize),
}

impl Depth {
    fn parse(s: &str) -> Result<Self> {
        if let Some(n) = s.strip_prefix("workers:") {
            return Ok(Depth::Workers(n.parse().context("--child workers:N needs a count")?));
        }
        match s.strip_prefix("fixed:") {
            Some(r) => Ok(Depth::Fixed(r.parse().context("--child fixed:R needs a depth")?)),
            None if s == "random" => Ok(Depth::Random),
            None => bail!("--child takes random, fixed:R or workers:N, not {s}"),
        }
    }

    fn arg(self) -> String {
        match self {
            Depth::Random => "random".into(),
            Depth::Fixed(r) => format!("fixed:{r}"),
            Depth::Workers(n) => format!("workers:{n}"),
        }
    }

    fn label(self, args: &Args) -> String {
        match self {
            Depth::Random => format!("random r̄={} k={}", args.mean_depth, args.backprop),
            Depth::Fixed(r) => format!("fixed r={r} k={}", args.backprop),
            Depth::Workers(n) => names(&args.workers()[..n]),
        }
    }
}

impl Args {
    /// Checks what the flags' parsers (their ranges) do not, and the memory a measurement will
    /// need, before any is made.
    fn check(&self) -> Result<()> {
        if self.handles > 1 && self.devices.is_empty() {
            bail!("--handles takes a positive count, and applies to --devices");
        }
        if !self.devices.is_empty() {
            // Found here too, so that a bad list is one error before any measurement.
            DeviceSpec::devices(&self.devices)?;
        }
        let model = HuginnConfig::tiny(self.vocab_size, self.width, self.heads, self.layers);
        model.validate().context("model shape")?;
        let on_host = self.devices.first().map_or(self.device, |d| d.backend) == Backend::Cpu;
        let shapes = Shapes {
            model: &model,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            backprop: self.backprop,
            devices: self.workers().len().max(1),
            eval_rows: 0,
            eval_len: 0,
        };
        train::memory::check("this measurement", shapes.host_bytes(on_host))?;
        Ok(())
    }

    fn config(&self, depth: Depth, steps: u64) -> BenchConfig {
        BenchConfig {
            width: self.width,
            heads: self.heads,
            layers: self.layers,
            vocab_size: self.vocab_size,
            seq_len: self.seq_len,
            batch_size: self.batch_size,
            depth: match depth {
                Depth::Random | Depth::Workers(_) => DepthScheme::PoissonLognormalFilling {
                    mean: self.mean_depth,
                    backprop: self.backprop,
                },
                Depth::Fixed(r) => DepthScheme::Fixed {
                    steps: r,
                    backprop: self.backprop,
                },
            },
            steps,
        }
    }

    /// The measurements: the randomized depth for speed, then each fixed depth for memory; or,
    /// with --devices, the randomized depth on each number of workers.
    fn runs(&self) -> Vec<(Depth, u64)> {
        if !self.devices.is_empty() {
            return (1..=self.workers().len())
                .map(|n| (Depth::Workers(n), self.steps))
                .collect();
        }
        std::iter::once((Depth::Random, self.steps))
            .chain(self.memory_depths.iter().map(|&r| (Depth::Fixed(r), self.memory_steps)))
            .collect()
    }

    /// `--devices` once each, then again for every further handle: a prefix of this list uses
    /// distinct devices before it shares one.
    fn workers(&self) -> Vec<DeviceSpec> {
        (0..self.handles).flat_map(|_| self.devices.iter().copied()).collect()
    }

    /// The autodiff devices a measurement runs on.
    fn measured_on(&self, depth: Depth) -> Result<Vec<Device>> {
        let devices = match depth {
            Depth::Workers(n) => {
                let found = DeviceSpec::devices(&self.devices)?;
                let workers: Vec<Device> = (0..self.handles).flat_map(|_| found.iter().cloned()).collect();
                workers.into_iter().take(n).collect()
            }
            Depth::Random | Depth::Fixed(_) => vec![self.device.device()?],
        };
        Ok(devices.into_iter().map(Device::autodiff).collect())
    }

    /// Runs one measurement in a child process and reads its result.
    fn spawn(&self, depth: Depth, steps: u64) -> Result<BenchResult> {
        let (p, c, o) = self.layers;
        let exe = std::env::current_exe().context("finding this binary to run a measurement")?;
        let mut command = Command::new(exe);
        match self.devices.is_empty() {
            true => command.args(["--device", self.device.name()]),
            false => command
                .args(["--devices", &names(&self.devices)])
                .args(["--handles", &self.handles.to_string()]),
        };
        let output = command
            .args(["--width", &self.width.to_string(), "--heads", &self.heads.to_string()])
            .args(["--layers", &format!("{p},{c},{o}")])
            .args(["--vocab-size", &self.vocab_size.to_string()])
            .args(["--mean-depth", &self.mean_depth.to_string()])
            .args(["--backprop", &self.backprop.to_string()])
            .args(["--seq-len", &self.seq_len.to_string()])
            .args(["--batch-size", &self.batch_size.to_string()])
            .args(["--steps", &steps.to_string(), "--child", &depth.arg()])
            .output()
            .context("starting a measurement")?;
        let label = depth.label(self);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let reason = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no message");
            bail!("{label}: {}", reason.trim_start_matches("error: "));
        }
        // The result is the last line: anything a backend prints before it is not ours.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(last).with_context(|| format!("{label}: unreadable result {last:?}"))
    }
}

/// A device list as `--devices` takes it.
fn names(specs: &[DeviceSpec]) -> String {
    specs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

/// Tokens/s of a measurement over that of the first (one worker).
fn speedup(results: &[(Depth, u64, BenchResult)], r: &BenchResult) -> f64 {
    r.tokens_per_second / results[0].2.tokens_per_second
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
}

/// The relative change from `a` to `b`, where both are known.
fn change(a: Option<u64>, b: Option<u64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0 => format!("{:+.1}%", 100.0 * (b as f64 - a as f64) / a as f64),
        _ => "n/a".into(),
    }
}

fn report(args: &Args, results: &[(Depth, u64, BenchResult)]) {
    let (p, c, o) = args.layers;
    let tokens = args.batch_size * args.seq_len;
    let backend = args.devices.first().map_or(args.device, |d| d.backend).name();
    let workers = |depth: &Depth| match depth {
        Depth::Workers(n) => *n,
        Depth::Random | Depth::Fixed(_) => 1,
    };
    if args.json {
        let runs: Vec<_> = results
            .iter()
            .map(|(depth, steps, r)| {
                json!({
                    "depth": depth.label(args),
                    "workers": workers(depth),
                    "tokens_per_step": workers(depth) * tokens,
                    "speedup": speedup(results, r),
                    "steps": steps,
                    "mean_depth": r.mean_depth,
                    "seconds_per_step": r.seconds_per_step,
                    "tokens_per_second": r.tokens_per_second,
                    "peak_rss_bytes": r.peak_rss_bytes,
                    "device_reserved_bytes": r.device_reserved_bytes,
                })
            })
            .collect();
        let out = json!({
            "device": backend,
            "devices": (!args.devices.is_empty()).then(|| names(&args.devices)),
            "handles": args.handles,
            "width": args.width,
            "heads": args.heads,
            "layers": [p, c, o],
            "vocab_size": args.vocab_size,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "tokens_per_step": tokens,
            "runs": runs,
        });
        println!("{out}");
        return;
    }
    println!(
        "{backend} · width {} · heads {} · layers {p},{c},{o} · vocab {} · seq {} × batch {} = {tokens} tokens/step{}",
        args.width,
        args.heads,
        args.vocab_size,
        args.seq_len,
        args.batch_size,
        if args.devices.is_empty() { "" } else { " per device" }
    );
    println!(
        "{:<20} {:>7} {:>6} {:>9} {:>10} {:>12} {:>12}",
        "depth", "mean r", "steps", "s/step", "tokens/s", "peak RSS", "device pool"
    );
    for (depth, steps, r) in results {
        println!(
            "{:<20} {:>7.1} {:>6} {:>9.3} {:>10.1} {:>12} {:>12}",
            depth.label(args),
            r.mean_depth,
            steps,
            r.seconds_per_step,
            r.tokens_per_second,
            mib(r.peak_rss_bytes),
            mib(r.device_reserved_bytes)
        );
    }
    if !args.devices.is_empty() {
        let gains: Vec<String> = results
            .iter()
            .map(|(depth, _, r)| format!("{} ×{:.2}", workers(depth), speedup(results, r)))
            .collect();
        println!("tokens/s over one worker: {}", gains.join(", "));
    }
    let fixed: Vec<_> = results.iter().filter(|(d, ..)| matches!(d, Depth::Fixed(_))).collect();
    if let [(Depth::Fixed(shallow), _, a), .., (Depth::Fixed(deep), _, b)] = fixed[..] {
        let device = match (a.device_reserved_bytes, b.device_reserved_bytes) {
            (Some(_), Some(_)) => format!(
                "device pool {} → {} ({})",
                mib(a.device_reserved_bytes),
                mib(b.device_reserved_bytes),
                change(a.device_reserved_bytes, b.device_reserved_bytes)
            ),
            _ => format!("no device pool reported by the {backend} backend: RSS only"),
        };
        println!(
            "memory r={deep} vs r={shallow}: peak RSS {} → {} ({}); {device}",
            mib(a.peak_rss_bytes),
            mib(b.peak_rss_bytes),
            change(a.peak_rss_bytes, b.peak_rss_bytes)
        );
    }
}

fn run(args: &Args) -> Result<()> {
    args.check()?;
    if let Some(depth) = &args.child {
        let depth = Depth::parse(depth)?;
        let result = measure(&args.config(depth, args.steps), &args.measured_on(depth)?)?;
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let mut results = Vec::new();
    for (depth, steps) in args.runs() {
        if !args.json {
            eprintln!("measuring {} ({steps} timed steps)…", depth.label(args));
        }
        results.push((depth, steps, args.spawn(depth, steps)?));
    }
    report(args, &results);
    Ok(())
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    // One device runs on this thread; --devices gives each worker a thread, which this one waits on.
    if args.devices.is_empty() {
        model::kernels::threads::join_the_pool();
        model::kernels::heap::keep_freed_memory();
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
