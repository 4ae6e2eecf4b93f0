//! `huginn-bench-serve` (`cargo xtask bench serve`): a load test of `huginn serve`. Starts the
//! server in this process on a loopback port, then N concurrent clients send a fixed number of
//! streaming completion requests, and reports throughput, time to first token and time per
//! output token (p50/p95/p99), errors and the process's peak memory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use infer::folder::ModelFolder;
use infer::serve::api::ServerDefaults;
use infer::serve::engine::EngineLimits;
use infer::serve::{App, serve};
use model::{Backend, HuginnConfig, peak_rss_bytes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "huginn-bench-serve", about = "Load test of the HTTP server")]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Model folder; without it, a random model of --width and --layers.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    width: usize,
    /// Prelude, core and coda layers of the random model.
    #[arg(long, value_delimiter = ',', default_value = "1,2,1")]
    layers: Vec<usize>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Recurrence steps per token.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Exit criterion sent with every request (none: fixed depth, batched).
    #[arg(long, default_value = "none")]
    criterion: String,
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    #[arg(long, default_value_t = 256)]
    queue: usize,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What one request saw.
struct Sample {
    ok: bool,
    first_token: Duration,
    /// From the first token to the last.
    decoding: Duration,
    tokens: usize,
}

fn main() -> ExitCode {
    infer::cli::main(run)
}

fn run(args: Args) -> Result<()> {
    if args.clients == 0 || args.requests == 0 || args.prompt_len == 0 || args.max_tokens == 0 {
        bail!("--clients, --requests, --prompt-len and --max-tokens must be at least 1");
    }
    let device = args.device.device()?;
    let folder = match &args.model {
        Some(dir) => ModelFolder::open(dir, &device).with_context(|| format!("loading {}", dir.display()))?,
        None => {
            let [prelude, core, coda] = args.layers[..] else {
                bail!("--layers takes three counts: prelude,core,coda");
            };
            let config = HuginnConfig::tiny(256, args.width, 4, (prelude, core, coda));
            ModelFolder::from_model(config.init(&device, 0))
        }
    };
    let vocab = folder.model.config().vocab_size as u32;
    let context = folder.model.config().block_size;
    if args.prompt_len + args.max_tokens > context {
        bail!("--prompt-len plus --max-tokens exceed the model's context of {context}");
    }
    let defaults = ServerDefaults {
        model_name: "bench".into(),
        num_steps: args.steps,
        max_num_steps: args.steps,
    };
    let limits = EngineLimits {
        max_batch: args.max_batch,
        queue_capacity: args.queue,
        kv_budget_bytes: usize::MAX,
        batch_window: Duration::from_millis(2),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let app = Arc::new(App::new(folder, defaults, limits, None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/completions", listener.local_addr()?);
        tokio::spawn(serve(listener, app, std::future::pending(), Duration::ZERO));
        let client = reqwest::Client::new();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let bodies: Vec<_> = (0..args.requests)
            .map(|_| {
                let prompt: Vec<u32> = (0..args.prompt_len).map(|_| rng.random_range(0..vocab)).collect();
                json!({"prompt": prompt, "max_tokens": args.max_tokens, "stream": true,
                       "exit_criterion": args.criterion, "temperature": 0})
            })
            .collect();
        let bodies = Arc::new(tokio::sync::Mutex::new(bodies));
        let started = Instant::now();
        let clients: Vec<_> = (0..args.clients)
            .map(|_| {
                let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    loop {
                        let Some(body) = bodies.lock().await.pop() else { break };
                        samples.push(request(&client, &url, body).await);
                    }
                    samples
                })
            })
            .collect();
        let mut samples = Vec::new();
        for client in clients {
            samples.extend(client.await?);
        }
        report(&args, &samples, started.elapsed());
        anyhow::Ok(())
    })
}

async fn request(client: &reqwest::Client, url: &str, body: serde_json::Value) -> Sample {
    let sent = Instant::now();
    let mut sample = Sample {
        ok: false,
        first_token: Duration::ZERO,
        decoding: Duration::ZERO,
        tokens: 0,
    };
    let Ok(mut response) = client.post(url).json(&body).send().await else {
        return sample;
    };
    if !response.status().is_success() {
        return sample;
    }
    let mut buffer = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer += &String::from_utf8_lossy(&chunk);
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                sample.ok = true;
                continue;
            }
            let Ok(value) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if value["choices"][0]["num_steps"].is_u64() {
                let since_sent = sent.elapsed();
                if sample.tokens == 0 {
                    sample.first_token = since_sent;
                }
                sample.decoding = since_sent - sample.first_token;
                sample.tokens += 1;
            }
        }
    }
    sample
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(args: &Args, samples: &[Sample], wall: Duration) {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.first_token.as_secs_f64() * 1e3).collect();
    // Time per output token of a request: its decoding time over the tokens after the first.
    let mut tpot: Vec<f64> = ok
        .iter()
        .filter(|s| s.tokens > 1)
        .map(|s| s.decoding.as_secs_f64() * 1e3 / (s.tokens - 1) as f64)
        .collect();
    ttft.sort_by(f64::total_cmp);
    tpot.sort_by(f64::total_cmp);
    let peak = peak_rss_bytes();
    let figures = json!({
        "clients": args.clients, "requests": args.requests, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "steps": args.steps, "criterion": args.criterion,
        "max_batch": args.max_batch, "wall_seconds": wall.as_secs_f64(),
        "completed": ok.len(), "errors": samples.len() - ok.len(), "tokens": tokens,
        "tokens_per_second": tokens as f64 / wall.as_secs_f64(),
        "ttft_ms": {"p50": percentile(&ttft, 0.5), "p95": percentile(&ttft, 0.95), "p99": percentile(&ttft, 0.99)},
        "tpot_ms": {"p50": percentile(&tpot, 0.5), "p95": percentile(&tpot, 0.95), "p99": percentile(&tpot, 0.99)},
        "peak_memory_bytes": peak,
    });
    if args.json {
        println!("{figures}");
        return;
    }
    println!(
        "{} clients, {} requests of {} prompt + {} new tokens at {} steps ({}), batches of up to {}",
        args.clients, args.requests, args.prompt_len, args.max_tokens, args.steps, args.criterion, args.max_batch
    );
    println!(
        "completed {} / errors {} in {:.2} s: {:.1} tokens/s",
        ok.len(),
        samples.len() - ok.len(),
        wall.as_secs_f64(),
        tokens as f64 / wall.as_secs_f64()
    );
    for (name, values) in [("time to first token", &ttft), ("time per output token", &tpot)] {
        println!(
            "{name:>22}: p50 {:8.1} ms  p95 {:8.1} ms  p99 {:8.1} ms",
            percentile(values, 0.5),
            percentile(values, 0.95),
            percentile(values, 0.99)
        );
    }
    match peak {
        Some(bytes) => println!("{:>22}: {:.0} MiB", "peak memory", bytes as f64 / (1 << 20) as f64),
        None => println!("{:>22}: unknown on this system", "peak memory"),
    }
}
