//! `huginn-bench-serve` (`cargo xtask bench serve`): a load test of `huginn serve`. Starts the
//! server in this process on a loopback port, then N concurrent clients send a fixed number of
//! streaming completion requests, and reports throughput, time to first token and time per
//! output token (p50/p95/p99), errors and the process's peak memory.
//!
//! With `--head-of-line`, one long request runs first and the clients each send one short
//! request 100 ms later: their time to first token against the same request's alone.
//!
//! With `--soak`, the clients instead mix whole streams with clients that leave at random
//! moments (before the response, after its headers, mid-stream) and bad requests (broken JSON,
//! unknown fields, prompts and bodies beyond the context), count the answers that were not what
//! each should get, and fail unless the server still answers and its memory stayed bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use folder::ModelFolder;
use infer::exit::Criterion;
use infer::serve::api::{InputLimits, ServerDefaults};
use infer::serve::engine::EngineLimits;
use infer::serve::{App, ConnectionLimits, serve};
use model::{Backend, HuginnConfig, peak_rss_bytes, rss_bytes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(name = "huginn-bench-serve", about = "Load or soak test of the HTTP server")]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: Backend,
    /// Model folder or ORG/NAME[@REVISION]; without it, a random model of --width and --layers.
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
    /// Most requests running together (the server's --max-batch).
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    #[arg(long, default_value_t = 256)]
    queue: usize,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Head-of-line blocking instead: one request of --long-tokens new tokens, then one short
    /// request (--max-tokens) from each client 100 ms later; their time to first token against
    /// a short request's alone.
    #[arg(long)]
    head_of_line: bool,
    /// With --head-of-line: new tokens of the long request.
    #[arg(long, default_value_t = 192)]
    long_tokens: usize,
    /// With --head-of-line: prompt tokens of the long request (default --prompt-len).
    #[arg(long)]
    long_prompt: Option<usize>,
    /// Most prompt positions per step (the server's --prefill-window).
    #[arg(long, default_value_t = EngineLimits::PREFILL_WINDOW)]
    prefill_window: NonZeroUsize,
    /// Most steps an exited token waits for company (the server's --exit-wait).
    #[arg(long, default_value_t = EngineLimits::EXIT_WAIT)]
    exit_wait: usize,
    /// A soak test instead: clients that leave at random moments and bad requests among whole
    /// streams of random settings (depth up to --steps, exit criteria, cache strategies, warm
    /// starts, sampling, lengths up to --prompt-len and --max-tokens); fails unless every answer is the expected one, the server still answers and
    /// its resident memory grew by at most --rss-growth-mib.
    #[arg(long)]
    soak: bool,
    /// With --soak: the most the resident memory may grow, from after a warm-up to the end.
    #[arg(long, default_value_t = 64)]
    rss_growth_mib: u64,
    /// With --soak: no new request after this many seconds.
    #[arg(long, default_value_t = 600)]
    soak_seconds: u64,
}

impl Args {
    fn long_prompt(&self) -> usize {
        self.long_prompt.unwrap_or(self.prompt_len)
    }
}

/// What one request saw.
struct Sample {
    ok: bool,
    first_token: Duration,
    /// From the first token to the last.
    decoding: Duration,
    tokens: usize,
    /// Recurrence steps of all its tokens.
    steps: usize,
}

fn main() -> ExitCode {
    infer::cli::main(run)
}

fn run(args: Args) -> Result<()> {
    if args.clients == 0 || args.requests == 0 || args.prompt_len == 0 || args.max_tokens == 0 {
        bail!("--clients, --requests, --prompt-len and --max-tokens must be at least 1");
    }
    let device = args.device.device()?;
    let mut folder = match &args.model {
        Some(dir) => {
            let dir = folder::hub::resolve(dir)?;
            ModelFolder::open(&dir, &device).with_context(|| format!("loading {}", dir.display()))?
        }
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
    if args.soak && folder.tokenizer.is_none() {
        if vocab < 256 {
            bail!("--soak sends text: a model without a tokenizer gets a byte-level one, which needs 256 ids");
        }
        folder.tokenizer = Some(byte_tokenizer()?);
    }
    if args.prompt_len + args.max_tokens > context {
        bail!("--prompt-len plus --max-tokens exceed the model's context of {context}");
    }
    if args.head_of_line && args.long_prompt() + args.long_tokens > context {
        bail!("the long request's prompt plus --long-tokens exceed the model's context of {context}");
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
        prefill_window: args.prefill_window,
        exit_wait: args.exit_wait,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let app = Arc::new(App::new(folder, defaults, limits, None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}/v1/completions");
        let input = app.input_limits();
        tokio::spawn(serve(
            listener,
            app,
            std::future::pending(),
            ConnectionLimits::default(),
        ));
        if args.soak {
            // The engine logs what goes wrong in it (a panic, its thread ending).
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .init();
            return soak(&args, addr, input, vocab).await;
        }
        if args.head_of_line {
            return head_of_line(&args, &url, vocab).await;
        }
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
        steps: 0,
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
        while let Some(data) = next_data(&mut buffer) {
            if data == "[DONE]" {
                sample.ok = true;
                continue;
            }
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&data) else {
                continue;
            };
            if let Some(steps) = value["choices"][0]["num_steps"].as_u64() {
                sample.steps += steps as usize;
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

/// Takes the next complete server-sent event that carries data out of `buffer`; its payload.
fn next_data(buffer: &mut String) -> Option<String> {
    while let Some(end) = buffer.find("\n\n") {
        let event: String = buffer.drain(..end + 2).collect();
        if let Some(data) = event.trim().strip_prefix("data: ") {
            return Some(data.to_string());
        }
    }
    None
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
    let steps: usize = ok.iter().map(|s| s.steps).sum();
    let mean_steps = steps as f64 / tokens.max(1) as f64;
    let figures = json!({
        "mean_steps_per_token": mean_steps,
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
        "completed {} / errors {} in {:.2} s: {:.1} tokens/s, {mean_steps:.2} recurrence steps per token",
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

/// The head-of-line scenario: short requests' time to first token alone (the median of five),
/// then beside one long request that started 100 ms before them.
async fn head_of_line(args: &Args, url: &str, vocab: u32) -> Result<()> {
    let client = reqwest::Client::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut body = |prompt_len: usize, max_tokens: usize| {
        let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.random_range(0..vocab)).collect();
        json!({"prompt": prompt, "max_tokens": max_tokens, "stream": true, "temperature": 0,
               "exit_criterion": args.criterion, "stop_token_ids": []})
    };
    let short: Vec<Value> = (0..args.clients)
        .map(|_| body(args.prompt_len, args.max_tokens))
        .collect();
    let long = body(args.long_prompt(), args.long_tokens);
    let mut solo = Vec::new();
    for body in short.iter().cycle().take(5) {
        let sample = request(&client, url, body.clone()).await;
        if !sample.ok {
            bail!("a short request alone failed");
        }
        solo.push(sample.first_token.as_secs_f64() * 1e3);
    }
    solo.sort_by(f64::total_cmp);
    let solo = solo[2];
    let spawn = |body: Value| {
        let (client, url) = (client.clone(), url.to_string());
        tokio::spawn(async move { request(&client, &url, body).await })
    };
    let long = spawn(long);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shorts: Vec<_> = short.into_iter().map(spawn).collect();
    let mut ttft = Vec::new();
    let mut errors = 0;
    for short in shorts {
        let sample = short.await?;
        if sample.ok {
            ttft.push(sample.first_token.as_secs_f64() * 1e3);
        } else {
            errors += 1;
        }
    }
    let long = long.await?;
    if !long.ok {
        errors += 1;
    }
    ttft.sort_by(f64::total_cmp);
    let p50 = percentile(&ttft, 0.5);
    let figures = json!({
        "head_of_line": true, "clients": args.clients, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "long_tokens": args.long_tokens, "long_prompt": args.long_prompt(),
        "prefill_window": args.prefill_window, "steps": args.steps,
        "criterion": args.criterion, "solo_ttft_ms": solo,
        "long_ttft_ms": long.first_token.as_secs_f64() * 1e3,
        "ttft_ms": {"p50": p50, "p95": percentile(&ttft, 0.95), "max": ttft.last()},
        "ratio_p50_to_solo": p50 / solo, "long_request_seconds": (long.first_token + long.decoding).as_secs_f64(),
        "errors": errors,
    });
    if args.json {
        println!("{figures}");
    } else {
        println!(
            "one request of {} prompt and {} new tokens, then {} of {} and {} 100 ms later ({} steps, {}, prefill window {})",
            args.long_prompt(),
            args.long_tokens,
            args.clients,
            args.prompt_len,
            args.max_tokens,
            args.steps,
            args.criterion,
            args.prefill_window
        );
        println!(
            "time to first token of the long one: {:.1} ms",
            long.first_token.as_secs_f64() * 1e3
        );
        println!(
            "time to first token of the short ones: p50 {p50:.1} ms, p95 {:.1} ms; alone {solo:.1} ms ({:.2}x); errors {errors}",
            percentile(&ttft, 0.95),
            p50 / solo
        );
    }
    Ok(())
}

/// A byte-level tokenizer without merges over ids 0-255, so that a random model takes text.
fn byte_tokenizer() -> Result<Tokenizer> {
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort();
    let vocab: Vocab = bytes.iter().map(char::to_string).zip(0..).collect();
    let model = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(|e| anyhow!("building the byte tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// What a soak request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Streams an answer to its end.
    Complete,
    /// Leaves before the response: at once, after half the request, or after all of it.
    LeaveBeforeHeaders,
    /// Leaves a stream right after its headers.
    LeaveAfterHeaders,
    /// Leaves a stream after a random number of its tokens.
    LeaveMidStream,
    /// Broken JSON: 400, naming no parameter.
    MalformedJson,
    /// A misspelt field: 400.
    UnknownField,
    /// Text a byte over what the context can hold: 400, before it is tokenized.
    LongText,
    /// Text at that bound: tokenized, then refused on its tokens (400).
    TextAtBound,
    /// More token ids than the context: 400.
    LongIds,
    /// A megabyte of prompt sent whole, or a body that says it is 16 MiB: 413.
    OversizedBody,
}

const KINDS: [Kind; 10] = [
    Kind::Complete,
    Kind::LeaveBeforeHeaders,
    Kind::LeaveAfterHeaders,
    Kind::LeaveMidStream,
    Kind::MalformedJson,
    Kind::UnknownField,
    Kind::LongText,
    Kind::TextAtBound,
    Kind::LongIds,
    Kind::OversizedBody,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::LeaveBeforeHeaders => "leave_before_headers",
            Self::LeaveAfterHeaders => "leave_after_headers",
            Self::LeaveMidStream => "leave_mid_stream",
            Self::MalformedJson => "malformed_json",
            Self::UnknownField => "unknown_field",
            Self::LongText => "long_text",
            Self::TextAtBound => "text_at_bound",
            Self::LongIds => "long_ids",
            Self::OversizedBody => "oversized_body",
        }
    }
}

/// How long any one step of a soak request may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The server a soak runs against.
struct Target {
    client: reqwest::Client,
    addr: SocketAddr,
    input: InputLimits,
    vocab: u32,
    prompt_len: usize,
    max_tokens: usize,
    steps: usize,
}

impl Target {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A streamed request of random settings: lengths, depth, exit criterion, cache strategy,
    /// warm start, sampling.
    fn stream_body(&self, rng: &mut ChaCha8Rng) -> Value {
        const STRATEGIES: [&str; 4] = ["full", "latest-m4", "compress-s4", "always-last-m4-compress-anchor"];
        let len = rng.random_range(1..=self.prompt_len);
        let prompt: Vec<u32> = (0..len).map(|_| rng.random_range(0..self.vocab)).collect();
        let warm_start = ["cold", "raw", "normalized"][rng.random_range(0..3)];
        let temperature = [0.0, 0.7][rng.random_range(0..2)];
        json!({
            "prompt": prompt, "max_tokens": rng.random_range(1..=self.max_tokens), "stream": true,
            "num_steps": rng.random_range(1..=self.steps),
            "exit_criterion": Criterion::ALL[rng.random_range(0..Criterion::ALL.len())].name(),
            "cache_strategy": STRATEGIES[rng.random_range(0..STRATEGIES.len())],
            "warm_start": warm_start, "temperature": temperature, "seed": rng.random::<u32>(),
        })
    }

    /// Sends `body` as is and checks the error answer: its status, code and (if given) param.
    async fn refused(
        &self,
        body: Vec<u8>,
        status: u16,
        code: Option<&str>,
        param: Option<&Value>,
    ) -> Result<(), String> {
        let response = self
            .client
            .post(self.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let got = response.status().as_u16();
        let answer: Value = response
            .json()
            .await
            .map_err(|e| format!("a {got} without JSON: {e}"))?;
        let error = &answer["error"];
        if got != status || code.is_some_and(|c| error["code"] != c) || param.is_some_and(|p| error["param"] != *p) {
            return Err(format!("expected {status} {code:?}, got {got}: {answer}"));
        }
        Ok(())
    }

    /// One request of `kind`: `Err` says how its answer was not the one expected.
    async fn send(&self, kind: Kind, rng: &mut ChaCha8Rng) -> Result<(), String> {
        let body = self.stream_body(rng);
        let context = self.input.context;
        let text_bytes = self.input.text_bytes().ok_or("the model has no tokenizer")?;
        match kind {
            Kind::Complete => {
                let response = self.stream(&body).await?;
                match read_events(response, usize::MAX).await? {
                    (_, true) => Ok(()),
                    (tokens, false) => Err(format!("the stream ended after {tokens} tokens without [DONE]")),
                }
            }
            Kind::LeaveBeforeHeaders => {
                let request = raw_request(&body.to_string());
                let cut = [0, request.len() / 2, request.len()][rng.random_range(0..3)];
                let stream = connect(self.addr).await?;
                write_all(&stream, &request[..cut]).await
            }
            Kind::LeaveAfterHeaders => {
                let stream = connect(self.addr).await?;
                write_all(&stream, &raw_request(&body.to_string())).await?;
                let (head, _) = read_head(&stream).await?;
                match head.starts_with("HTTP/1.1 200") {
                    true => Ok(()),
                    false => Err(format!("a stream answered {}", head.lines().next().unwrap_or(""))),
                }
            }
            Kind::LeaveMidStream => {
                let leave_after = rng.random_range(1..=self.max_tokens);
                let response = self.stream(&body).await?;
                read_events(response, leave_after).await.map(|_| ())
            }
            Kind::MalformedJson => {
                self.refused(b"{\"prompt\": [1, 2,".to_vec(), 400, None, Some(&Value::Null))
                    .await
            }
            Kind::UnknownField => {
                let body = json!({"prompt": [1, 2], "max_token": 3}).to_string();
                self.refused(body.into_bytes(), 400, None, None).await
            }
            Kind::LongText | Kind::TextAtBound => {
                let bytes = text_bytes + usize::from(kind == Kind::LongText);
                let body = json!({"prompt": "x".repeat(bytes)}).to_string();
                self.refused(body.into_bytes(), 400, Some("context_length_exceeded"), None)
                    .await
            }
            Kind::LongIds => {
                let body = json!({"prompt": vec![1; context + 1]}).to_string();
                self.refused(body.into_bytes(), 400, Some("context_length_exceeded"), None)
                    .await
            }
            Kind::OversizedBody if rng.random_bool(0.5) => {
                // A megabyte of prompt, sent whole.
                let body = json!({"prompt": "x".repeat(1 << 20)}).to_string();
                self.refused(body.into_bytes(), 413, Some("request_too_large"), None)
                    .await
            }
            Kind::OversizedBody => {
                let stream = connect(self.addr).await?;
                write_all(&stream, raw_head(16 << 20).as_bytes()).await?;
                let (status, answer) = read_response(&stream).await?;
                match (status, answer["error"]["code"].as_str()) {
                    (413, Some("request_too_large")) => Ok(()),
                    _ => Err(format!("expected 413 request_too_large, got {status}: {answer}")),
                }
            }
        }
    }

    async fn stream(&self, body: &Value) -> Result<reqwest::Response, String> {
        let response = self
            .client
            .post(self.url("/v1/completions"))
            .json(body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        match response.status().as_u16() {
            200 => Ok(response),
            status => Err(format!(
                "a stream answered {status}: {}",
                response.text().await.unwrap_or_default()
            )),
        }
    }

    /// Once the engine is idle, a normal request is answered and `/health` says ok. (A request
    /// sent before the engine is idle could hide one that ended on becoming idle.)
    async fn serving(&self) -> Result<(), String> {
        let since = Instant::now();
        loop {
            let health: Value = self
                .client
                .get(self.url("/health"))
                .send()
                .await
                .map_err(|e| format!("asking /health: {e}"))?
                .json()
                .await
                .map_err(|e| format!("/health: {e}"))?;
            if health["queued"] == 0 && health["running"] == 0 {
                break;
            }
            if since.elapsed() > STEP_TIMEOUT {
                return Err(format!("the engine is still busy: {health}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 4});
        let response = self
            .client
            .post(self.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        if response.status() != 200 {
            return Err(format!("a normal request answered {}", response.status()));
        }
        let health = self
            .client
            .get(self.url("/health"))
            .send()
            .await
            .map_err(|e| format!("asking /health: {e}"))?;
        let status = health.status();
        let health: Value = health.json().await.map_err(|e| format!("/health: {e}"))?;
        match (status.as_u16(), health["status"].as_str()) {
            (200, Some("ok")) => Ok(()),
            _ => Err(format!("/health answered {status}: {health}")),
        }
    }
}

/// Reads a stream's events until `[DONE]`, or until `leave_after` tokens have come: the tokens
/// seen and whether `[DONE]` came. An error event is an `Err`.
async fn read_events(mut response: reqwest::Response, leave_after: usize) -> Result<(usize, bool), String> {
    let mut buffer = String::new();
    let mut tokens = 0;
    loop {
        let chunk = tokio::time::timeout(STEP_TIMEOUT, response.chunk())
            .await
            .map_err(|_| format!("no event for {STEP_TIMEOUT:?}"))?
            .map_err(|e| format!("reading the stream: {e}"))?;
        let Some(chunk) = chunk else {
            return Ok((tokens, false));
        };
        buffer += &String::from_utf8_lossy(&chunk);
        while let Some(data) = next_data(&mut buffer) {
            if data == "[DONE]" {
                return Ok((tokens, true));
            }
            let value: Value = serde_json::from_str(&data).map_err(|e| format!("an event that is not JSON: {e}"))?;
            if !value["error"].is_null() {
                return Err(format!("an error event: {value}"));
            }
            if value["choices"][0]["num_steps"].is_u64() {
                tokens += 1;
                if tokens >= leave_after {
                    return Ok((tokens, false));
                }
            }
        }
    }
}

fn raw_head(content_length: usize) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n\r\n"
    )
}

fn raw_request(body: &str) -> Vec<u8> {
    [raw_head(body.len()).as_bytes(), body.as_bytes()].concat()
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| format!("connecting: {e}"))
}

/// Writes all of `bytes` (tokio's `net` alone has no `write_all`).
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> Result<(), String> {
    while !bytes.is_empty() {
        tokio::time::timeout(STEP_TIMEOUT, stream.writable())
            .await
            .map_err(|_| "writing timed out".to_string())?
            .map_err(|e| format!("writing: {e}"))?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("writing: {e}")),
        }
    }
    Ok(())
}

/// Appends what has come to `read`, waiting for something; `Err` once the server has closed.
async fn read_more(stream: &TcpStream, read: &mut Vec<u8>) -> Result<(), String> {
    let mut buffer = [0u8; 4096];
    loop {
        tokio::time::timeout(STEP_TIMEOUT, stream.readable())
            .await
            .map_err(|_| "reading timed out".to_string())?
            .map_err(|e| format!("reading: {e}"))?;
        match stream.try_read(&mut buffer) {
            Ok(0) => return Err("the server closed the connection mid-response".into()),
            Ok(n) => {
                read.extend_from_slice(&buffer[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("reading: {e}")),
        }
    }
}

/// A response's headers, and what came after them.
async fn read_head(stream: &TcpStream) -> Result<(String, Vec<u8>), String> {
    let mut read = Vec::new();
    loop {
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = read.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&read).into_owned(), rest));
        }
        read_more(stream, &mut read).await?;
    }
}

/// A whole response's status and JSON body.
async fn read_response(stream: &TcpStream) -> Result<(u16, Value), String> {
    let (head, mut body) = read_head(stream).await?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ")?.parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
    while body.len() < length {
        read_more(stream, &mut body).await?;
    }
    let answer = serde_json::from_slice(&body).map_err(|e| format!("a {status} without JSON: {e}"))?;
    Ok((status, answer))
}

/// What the soak counted for one kind of request.
#[derive(Default)]
struct Tally {
    sent: usize,
    unexpected: usize,
}

async fn soak(args: &Args, addr: SocketAddr, input: InputLimits, vocab: u32) -> Result<()> {
    let target = Arc::new(Target {
        client: reqwest::Client::builder()
            .timeout(STEP_TIMEOUT)
            .build()
            .context("building the HTTP client")?,
        addr,
        input,
        vocab,
        prompt_len: args.prompt_len,
        max_tokens: args.max_tokens,
        steps: args.steps,
    });
    // The start is measured after every client has streamed one answer, so that what the model
    // and the allocator keep for good is in it.
    let warm_up: Vec<_> = (0..args.clients as u64)
        .map(|i| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut rng = ChaCha8Rng::seed_from_u64(u64::MAX - i);
                target.send(Kind::Complete, &mut rng).await
            })
        })
        .collect();
    for client in warm_up {
        client.await?.map_err(|e| anyhow!("warming up: {e}"))?;
    }
    let rss_start = rss_bytes();
    let deadline = Instant::now() + Duration::from_secs(args.soak_seconds);
    let started = Instant::now();
    let mut tallies: BTreeMap<&str, Tally> = KINDS.iter().map(|k| (k.name(), Tally::default())).collect();
    let mut unexpected = Vec::new();
    // A quarter of the requests one at a time, where a client leaves an idle engine, the rest
    // from every client at once, where it leaves a running batch or a queue.
    let quarter = args.requests / 4;
    for (clients, first, until) in [(1, 0, quarter), (args.clients, quarter, args.requests)] {
        let next = Arc::new(AtomicUsize::new(first));
        let clients: Vec<_> = (0..clients)
            .map(|_| {
                let (target, next) = (target.clone(), next.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= until || Instant::now() >= deadline {
                            break;
                        }
                        // Each request's kind and moments follow from its index alone.
                        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
                        let kind = KINDS[rng.random_range(0..KINDS.len())];
                        outcomes.push((kind, target.send(kind, &mut rng).await));
                    }
                    outcomes
                })
            })
            .collect();
        for client in clients {
            for (kind, outcome) in client.await? {
                let tally = tallies.get_mut(kind.name()).expect("every kind is tallied");
                tally.sent += 1;
                if let Err(why) = outcome {
                    tally.unexpected += 1;
                    unexpected.push(format!("{}: {why}", kind.name()));
                }
            }
        }
    }
    let wall = started.elapsed();
    let serving = target.serving().await;
    let rss_end = rss_bytes();
    let growth_limit = args.rss_growth_mib << 20;
    let rss_growth = rss_start.zip(rss_end).map(|(start, end)| end as i64 - start as i64);
    let sent: usize = tallies.values().map(|t| t.sent).sum();
    let mut failures = Vec::new();
    if !unexpected.is_empty() {
        failures.push(format!("{} unexpected answers", unexpected.len()));
    }
    if let Err(why) = &serving {
        failures.push(format!("the server no longer serves: {why}"));
    }
    if rss_growth.is_some_and(|g| g > growth_limit as i64) {
        failures.push(format!("resident memory grew by more than {} MiB", args.rss_growth_mib));
    }
    let kinds: serde_json::Map<String, Value> = tallies
        .iter()
        .map(|(name, t)| (name.to_string(), json!({"sent": t.sent, "unexpected": t.unexpected})))
        .collect();
    let figures = json!({
        "soak": true, "clients": args.clients, "requests": sent, "wall_seconds": wall.as_secs_f64(),
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "steps": args.steps,
        "max_batch": args.max_batch, "kinds": kinds,
        "unexpected": unexpected.iter().take(10).collect::<Vec<_>>(),
        "serving_after": serving.as_ref().err(), "rss_start_bytes": rss_start, "rss_end_bytes": rss_end,
        "rss_growth_limit_bytes": growth_limit, "peak_memory_bytes": peak_rss_bytes(),
        "text_bytes_limit": input.text_bytes(), "body_bytes_limit": input.body_bytes(),
        "passed": failures.is_empty(),
    });
    if args.json {
        println!("{figures}");
    } else {
        let mib = |b: Option<u64>| b.map_or("unknown".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64));
        println!(
            "soak: {sent} requests, a quarter from one client, the rest from {}, in {:.1} s \
             (prompts of {} tokens, {} new, {} steps)",
            args.clients,
            wall.as_secs_f64(),
            args.prompt_len,
            args.max_tokens,
            args.steps
        );
        for (name, t) in &tallies {
            println!("{name:>22}: {:5} sent, {:5} unexpected", t.sent, t.unexpected);
        }
        for why in unexpected.iter().take(10) {
            println!("  unexpected: {why}");
        }
        println!(
            "{:>22}: {}",
            "serving after",
            serving.as_ref().map_or_else(String::clone, |()| "ok".into())
        );
        println!(
            "{:>22}: {} at the start, {} at the end (at most {} MiB more allowed), peak {}",
            "resident memory",
            mib(rss_start),
            mib(rss_end),
            args.rss_growth_mib,
            mib(peak_rss_bytes())
        );
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}
